/* File and memory helpers for the storage tiers.
 *
 * Each returns 0 on success or an errno value; none sets errno for the caller to read,
 * so the result survives whatever runs between the call and the error report. */
#ifndef MTCKPT_FILEIO_H
#define MTCKPT_FILEIO_H

#include <stddef.h>
#include <stdint.h>

/* Makes every page of [buf, buf + len) resident and writable-mapped, leaving its
 * contents unchanged. Concurrent writers to the range may lose a write when the
 * touch-each-page fallback runs, so call it before handing the buffer out. */
int prefault_pages(void *buf, size_t len);

/* posix_fallocate(fd, offset, len). */
int fallocate_range(int fd, int64_t offset, int64_t len);

/* Writes all len bytes at offset, retrying short writes and EINTR. */
int pwrite_all(int fd, const void *data, size_t len, int64_t offset);

/* Reads up to len bytes at offset into buf, retrying short reads and EINTR; *nread is
 * less than len only at end of file. */
int pread_full(int fd, void *buf, size_t len, int64_t offset, size_t *nread);

#endif /* MTCKPT_FILEIO_H */
