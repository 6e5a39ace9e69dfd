/* Copies and checksums over large buffers, split across short-lived pthreads.
 *
 * None of these touch Python: callers hold the buffers and may release the GIL. */
#ifndef MTCKPT_COPY_H
#define MTCKPT_COPY_H

#include <stddef.h>
#include <stdint.h>

/* Thread counts above this are clamped: two cores' worth of memory bandwidth is
 * saturated long before, and it bounds the per-call bookkeeping. */
#define MTCKPT_MAX_THREADS 64

struct copy_pair {
    void *dst;
    const void *src;
    size_t len;
};

/* Copies every pair; the total bytes are divided evenly over up to `threads` threads
 * (one of them the caller), so one thread may take the tail of one pair and the head
 * of the next. */
void copy_pairs(const struct copy_pair *pairs, size_t npairs, int threads);

/* Copies src into dst and returns the crc32c of src continued from `crc`, in one pass
 * over cache-sized blocks. */
uint32_t copy_crc32c(void *dst, const void *src, size_t len, uint32_t crc);

/* out[i] = crc32c of the i-th chunk_size piece of data (the last may be shorter);
 * out must hold ceil(len / chunk_size) entries. */
void crc32c_chunks(const void *data, size_t len, size_t chunk_size, uint32_t *out, int threads);

/* out[i] = 1 if the i-th chunk_size piece of a (the last may be shorter) equals the
 * piece of b at the same offset, byte for byte and in length, else 0; out must hold
 * ceil(a_len / chunk_size) entries. */
void equal_chunks(const void *a, size_t a_len, const void *b, size_t b_len, size_t chunk_size,
                  unsigned char *out, int threads);

#endif /* MTCKPT_COPY_H */
