/* Copies and chunked checksums, split across threads created for the one call. */
#include "copy.h"

#include <pthread.h>
#include <string.h>

#if defined(__x86_64__)
#include <emmintrin.h>
#endif

#include "crc32c.h"

/* Below this many bytes in all, starting threads costs more than it saves. */
#define PARALLEL_MIN_BYTES ((size_t)8 << 20)
/* No thread gets less than this, so a 9 MiB copy with 8 threads uses two. */
#define MIN_BYTES_PER_THREAD ((size_t)4 << 20)
/* Calls moving at least this much in all copy with non-temporal stores (see
 * copy_streaming); smaller ones use memcpy and leave the destination in cache. */
#define STREAMING_MIN_BYTES ((size_t)4 << 20)
/* Shares of a split copy start on multiples of this (in the concatenated pairs). */
#define SHARE_ALIGN ((size_t)4096)
/* copy_crc32c copies a block, then checksums it from src while that is still in L2.
 * Throughput was flat from 24 to 384 KiB (about 9.3 GiB/s on 1 GiB); a multiple of the
 * crc's three-stream stride (3 x 8 KiB) keeps it on its fast loop. A fused loop (crc32
 * on each word, non-temporal store of it) measured far slower here (0.3-3.5 GiB/s). */
#define COPY_CRC_BLOCK ((size_t)96 << 10)

typedef void *(*task_fn)(void *task);
typedef void (*copy_fn)(void *dst, const void *src, size_t len);

static void copy_cached(void *dst, const void *src, size_t len)
{
    if (len)
        memcpy(dst, src, len);
}

#if defined(__x86_64__)
/* memcpy with non-temporal stores, so the destination bypasses the cache. glibc streams
 * only single copies above about 3/4 of L3; staging is many smaller pieces that nobody
 * reads soon, and for 64 KiB-32 MiB pieces streaming through 1 GiB this measured 15.4
 * GiB/s against memcpy's 9. SSE2 is part of x86-64, so no CPU check is needed. */
static void copy_streaming(void *dst, const void *src, size_t len)
{
    unsigned char *to = dst;
    const unsigned char *from = src;
    size_t head = (size_t)(-(uintptr_t)to & 15); /* stream stores need 16-byte alignment */
    if (head > len)
        head = len;
    copy_cached(to, from, head);
    to += head, from += head, len -= head;
    for (; len >= 64; to += 64, from += 64, len -= 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)from);
        __m128i b = _mm_loadu_si128((const __m128i *)(from + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(from + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(from + 48));
        _mm_stream_si128((__m128i *)to, a);
        _mm_stream_si128((__m128i *)(to + 16), b);
        _mm_stream_si128((__m128i *)(to + 32), c);
        _mm_stream_si128((__m128i *)(to + 48), d);
    }
    _mm_sfence(); /* streamed stores are weakly ordered: publish them before returning */
    copy_cached(to, from, len);
}
#else
#define copy_streaming copy_cached
#endif

static copy_fn copy_for(size_t total)
{
    return total >= STREAMING_MIN_BYTES ? copy_streaming : copy_cached;
}

/* How many threads to use for `total` bytes that split into at most `max_parts`. */
static int thread_count(size_t total, int threads, size_t max_parts)
{
    if (threads <= 1 || total < PARALLEL_MIN_BYTES)
        return 1;
    size_t count = (size_t)threads;
    if (count > MTCKPT_MAX_THREADS)
        count = MTCKPT_MAX_THREADS;
    if (count > total / MIN_BYTES_PER_THREAD)
        count = total / MIN_BYTES_PER_THREAD;
    if (count > max_parts)
        count = max_parts;
    return count < 1 ? 1 : (int)count;
}

/* Runs fn on each of ntasks tasks (task_size bytes apart), the first on the calling
 * thread. A thread that cannot be started has its task run inline, so the work always
 * completes; it is only slower. */
static void run_parallel(task_fn fn, void *tasks, size_t task_size, int ntasks)
{
    pthread_t threads[MTCKPT_MAX_THREADS];
    int started[MTCKPT_MAX_THREADS] = {0};

    for (int i = 1; i < ntasks; i++) {
        void *task = (char *)tasks + (size_t)i * task_size;
        started[i] = pthread_create(&threads[i], NULL, fn, task) == 0;
        if (!started[i])
            fn(task);
    }
    fn(tasks);
    for (int i = 1; i < ntasks; i++)
        if (started[i])
            pthread_join(threads[i], NULL);
}

/* `bytes` bytes of the concatenated pairs, starting `offset` bytes into pairs[first]. */
struct copy_task {
    copy_fn copy;
    const struct copy_pair *pairs;
    size_t first;
    size_t offset;
    size_t bytes;
};

static void *copy_task_run(void *arg)
{
    const struct copy_task *task = arg;
    size_t index = task->first, offset = task->offset, left = task->bytes;
    while (left) {
        const struct copy_pair *pair = &task->pairs[index];
        size_t n = pair->len - offset;
        if (n > left)
            n = left;
        task->copy((char *)pair->dst + offset, (const char *)pair->src + offset, n);
        left -= n;
        index++;
        offset = 0;
    }
    return NULL;
}

void copy_pairs(const struct copy_pair *pairs, size_t npairs, int threads)
{
    size_t total = 0;
    for (size_t i = 0; i < npairs; i++)
        total += pairs[i].len;

    copy_fn copy = copy_for(total);
    int nthreads = thread_count(total, threads, SIZE_MAX);
    if (nthreads == 1) {
        for (size_t i = 0; i < npairs; i++)
            copy(pairs[i].dst, pairs[i].src, pairs[i].len);
        return;
    }

    size_t share = (total + (size_t)nthreads - 1) / (size_t)nthreads;
    share = (share + SHARE_ALIGN - 1) / SHARE_ALIGN * SHARE_ALIGN;
    struct copy_task tasks[MTCKPT_MAX_THREADS];
    int ntasks = 0;
    size_t index = 0, offset = 0, left = total;
    while (left) {
        size_t bytes = share < left ? share : left;
        tasks[ntasks++] = (struct copy_task){copy, pairs, index, offset, bytes};
        left -= bytes;
        /* Walk (index, offset) forward past this share. */
        while (bytes) {
            size_t room = pairs[index].len - offset;
            if (bytes < room) {
                offset += bytes;
                bytes = 0;
            } else {
                bytes -= room;
                index++;
                offset = 0;
            }
        }
    }
    run_parallel(copy_task_run, tasks, sizeof tasks[0], ntasks);
}

uint32_t copy_crc32c(void *dst, const void *src, size_t len, uint32_t crc)
{
    /* Restores call this chunk by chunk (1 MiB by default) through far larger files: the
     * destination is streamed whatever the size of one call. memcpy of these blocks
     * measured 1 GiB/s against 6 GiB/s streamed (256 MiB in 1 MiB calls). */
    copy_fn copy = len >= COPY_CRC_BLOCK ? copy_streaming : copy_cached;
    for (size_t done = 0; done < len; done += COPY_CRC_BLOCK) {
        size_t n = len - done < COPY_CRC_BLOCK ? len - done : COPY_CRC_BLOCK;
        copy((char *)dst + done, (const char *)src + done, n);
        crc = crc32c_update(crc, (const char *)src + done, n);
    }
    return crc;
}

/* Chunks [first, first + count) of the data. */
struct chunk_task {
    const unsigned char *data;
    size_t len;
    size_t chunk_size;
    uint32_t *out;
    size_t first;
    size_t count;
};

static void *chunk_task_run(void *arg)
{
    const struct chunk_task *task = arg;
    for (size_t i = task->first; i < task->first + task->count; i++) {
        size_t start = i * task->chunk_size;
        size_t n = task->len - start < task->chunk_size ? task->len - start : task->chunk_size;
        task->out[i] = crc32c_update(0, task->data + start, n);
    }
    return NULL;
}

void crc32c_chunks(const void *data, size_t len, size_t chunk_size, uint32_t *out, int threads)
{
    size_t nchunks = len / chunk_size + (len % chunk_size != 0);
    int nthreads = thread_count(len, threads, nchunks);
    struct chunk_task tasks[MTCKPT_MAX_THREADS];
    /* Whole chunks per thread, as evenly as the count allows. */
    for (int t = 0; t < nthreads; t++) {
        size_t first = nchunks * (size_t)t / (size_t)nthreads;
        size_t end = nchunks * (size_t)(t + 1) / (size_t)nthreads;
        tasks[t] = (struct chunk_task){data, len, chunk_size, out, first, end - first};
    }
    run_parallel(chunk_task_run, tasks, sizeof tasks[0], nthreads);
}

/* Chunks [first, first + count) of a compared with the same chunks of b. */
struct equal_task {
    const unsigned char *a;
    size_t a_len;
    const unsigned char *b;
    size_t b_len;
    size_t chunk_size;
    unsigned char *out;
    size_t first;
    size_t count;
};

static void *equal_task_run(void *arg)
{
    const struct equal_task *task = arg;
    for (size_t i = task->first; i < task->first + task->count; i++) {
        size_t start = i * task->chunk_size;
        size_t n = task->a_len - start < task->chunk_size ? task->a_len - start : task->chunk_size;
        size_t m = start >= task->b_len ? 0
                   : task->b_len - start < task->chunk_size ? task->b_len - start
                                                            : task->chunk_size;
        task->out[i] = n == m && memcmp(task->a + start, task->b + start, n) == 0;
    }
    return NULL;
}

void equal_chunks(const void *a, size_t a_len, const void *b, size_t b_len, size_t chunk_size,
                  unsigned char *out, int threads)
{
    size_t nchunks = a_len / chunk_size + (a_len % chunk_size != 0);
    int nthreads = thread_count(a_len, threads, nchunks);
    struct equal_task tasks[MTCKPT_MAX_THREADS];
    for (int t = 0; t < nthreads; t++) {
        size_t first = nchunks * (size_t)t / (size_t)nthreads;
        size_t end = nchunks * (size_t)(t + 1) / (size_t)nthreads;
        tasks[t] = (struct equal_task){a, a_len, b, b_len, chunk_size, out, first, end - first};
    }
    run_parallel(equal_task_run, tasks, sizeof tasks[0], nthreads);
}
