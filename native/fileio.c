/* File and memory helpers: pre-faulting, preallocation and whole-buffer pread/pwrite. */
#define _GNU_SOURCE /* madvise, pread, pwrite and posix_fallocate under -std=c11 */

#include "fileio.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <unistd.h>

/* Linux 5.14+: populate page tables writable, allocating pages as a write fault would. */
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

#define PREFAULT_CALL_BYTES ((uintptr_t)512 << 10)

int prefault_pages(void *buf, size_t len)
{
    if (len == 0)
        return 0;
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t first = (uintptr_t)buf;
    uintptr_t end = first + len;

#if defined(__linux__)
    uintptr_t start = first & ~(page - 1);
    uintptr_t stop = (end + page - 1) & ~(page - 1);
    /* One call holds the process's mmap lock for its whole range; a training thread
     * that maps or unmaps memory meanwhile (malloc does) waits for all of it, and then
     * its own page faults queue behind that writer. Bounded calls let it in between. */
    uintptr_t at = start;
    while (at < stop) {
        uintptr_t span = stop - at < PREFAULT_CALL_BYTES ? stop - at : PREFAULT_CALL_BYTES;
        if (madvise((void *)at, span, MADV_POPULATE_WRITE) != 0)
            break;
        at += span;
    }
    if (at == stop)
        return 0;
    /* ENOMEM/EFAULT/EHWPOISON mean the pages cannot be backed (a full tmpfs, say): a
     * touch would then die of SIGBUS, so report it. Anything else (EINVAL from an older
     * kernel or an odd mapping) means the advice is unsupported: touch instead. */
    if (errno == ENOMEM || errno == EFAULT
#ifdef EHWPOISON
        || errno == EHWPOISON
#endif
    )
        return errno;
#endif

    /* Read and write back one byte per page: the write makes the page present and
     * writable without changing it. */
    volatile unsigned char *byte = (volatile unsigned char *)first;
    *byte = *byte;
    for (uintptr_t addr = (first & ~(page - 1)) + page; addr < end; addr += page) {
        byte = (volatile unsigned char *)addr;
        *byte = *byte;
    }
    return 0;
}

int fallocate_range(int fd, int64_t offset, int64_t len)
{
#if defined(__APPLE__)
    (void)fd, (void)offset, (void)len;
    return EOPNOTSUPP; /* macOS has no posix_fallocate */
#else
    /* posix_fallocate returns its error instead of setting errno. */
    return posix_fallocate(fd, (off_t)offset, (off_t)len);
#endif
}

int pwrite_all(int fd, const void *data, size_t len, int64_t offset)
{
    const char *next = data;
    while (len) {
        ssize_t n = pwrite(fd, next, len, (off_t)offset);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (n == 0)
            return EIO; /* no progress and no error: stop rather than spin */
        next += n;
        len -= (size_t)n;
        offset += n;
    }
    return 0;
}

int pread_full(int fd, void *buf, size_t len, int64_t offset, size_t *nread)
{
    char *next = buf;
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, next + done, len - done, (off_t)(offset + (int64_t)done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            *nread = done;
            return errno;
        }
        if (n == 0)
            break; /* end of file */
        done += (size_t)n;
    }
    *nread = done;
    return 0;
}
