/* CRC-32C: a portable slicing-by-8 path and the CPU's CRC instruction (SSE4.2 on
 * x86-64, the ARMv8 CRC extension on aarch64), chosen once by crc32c_init().
 *
 * The x86-64 path follows Mark Adler's crc32c.c: the crc32 instruction has a latency
 * of three cycles but a throughput of one per cycle, so three independent streams over
 * adjacent blocks keep it busy, and their crcs are merged with tables that shift a crc
 * over a block's worth of zero bytes. */
#include "crc32c.h"

#include <string.h>

#if defined(__x86_64__)
#include <nmmintrin.h>
#elif defined(__aarch64__)
#include <arm_acle.h>
#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1 << 7)
#endif
#endif
#endif

/* The CRC-32C polynomial 0x1EDC6F41, bit-reversed. */
#define CRC32C_POLY 0x82F63B78u

/* Block sizes of the three-stream hardware loop; see sse42_three_streams(). */
#define LONG_BLOCK 8192
#define SHORT_BLOCK 256

/* x^(2^k) mod p(x) for k < X2N_COUNT: enough for shifts of up to 2^64 bytes (2^67 bits). */
#define X2N_COUNT 67

static uint32_t sw_table[8][256];
static uint32_t x2n_table[X2N_COUNT];
static uint32_t long_shift[4][256];  /* shifts a crc register over LONG_BLOCK zeros */
static uint32_t short_shift[4][256]; /* ... over SHORT_BLOCK zeros */

typedef uint32_t (*crc32c_fn)(uint32_t crc, const void *data, size_t len);
static crc32c_fn hw_impl;                     /* NULL when the CPU has no instruction */
static crc32c_fn best_impl = crc32c_update_sw;
static const char *hardware_name = "none";

/* a(x) * b(x) mod p(x), bit-reflected as the crc is; a must not be zero. */
static uint32_t multmodp(uint32_t a, uint32_t b)
{
    uint32_t m = (uint32_t)1 << 31;
    uint32_t product = 0;
    for (;;) {
        if (a & m) {
            product ^= b;
            if ((a & (m - 1)) == 0)
                break;
        }
        m >>= 1;
        b = (b & 1) ? (b >> 1) ^ CRC32C_POLY : b >> 1;
    }
    return product;
}

/* x^(n * 2^k) mod p(x): the operator that appends n zero bytes when k is 3. */
static uint32_t x2nmodp(uint64_t n, unsigned k)
{
    uint32_t p = (uint32_t)1 << 31; /* x^0 */
    while (n) {
        if (n & 1)
            p = multmodp(x2n_table[k], p);
        n >>= 1;
        k++;
    }
    return p;
}

/* Byte tables applying "append len zero bytes" to a crc register. */
static void build_shift_table(uint32_t table[4][256], uint64_t len)
{
    uint32_t op = x2nmodp(len, 3);
    for (uint32_t n = 0; n < 256; n++)
        for (int byte = 0; byte < 4; byte++)
            table[byte][n] = multmodp(op, n << (8 * byte));
}

static inline uint32_t shift_crc(const uint32_t table[4][256], uint32_t crc)
{
    return table[0][crc & 0xff] ^ table[1][(crc >> 8) & 0xff] ^
           table[2][(crc >> 16) & 0xff] ^ table[3][crc >> 24];
}

uint32_t crc32c_combine(uint32_t crc1, uint32_t crc2, uint64_t len2)
{
    return multmodp(x2nmodp(len2, 3), crc1) ^ crc2;
}

uint32_t crc32c_update_sw(uint32_t crc, const void *data, size_t len)
{
    const unsigned char *next = data;
    uint32_t reg = crc ^ 0xFFFFFFFFu;

    while (len && ((uintptr_t)next & 7)) {
        reg = sw_table[0][(reg ^ *next++) & 0xff] ^ (reg >> 8);
        len--;
    }
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    /* Slicing-by-8: one lookup per byte, but eight independent ones per word. */
    while (len >= 8) {
        uint64_t word;
        memcpy(&word, next, 8);
        word ^= reg;
        reg = sw_table[7][word & 0xff] ^ sw_table[6][(word >> 8) & 0xff] ^
              sw_table[5][(word >> 16) & 0xff] ^ sw_table[4][(word >> 24) & 0xff] ^
              sw_table[3][(word >> 32) & 0xff] ^ sw_table[2][(word >> 40) & 0xff] ^
              sw_table[1][(word >> 48) & 0xff] ^ sw_table[0][word >> 56];
        next += 8;
        len -= 8;
    }
#endif
    while (len--)
        reg = sw_table[0][(reg ^ *next++) & 0xff] ^ (reg >> 8);
    return reg ^ 0xFFFFFFFFu;
}

#if defined(__x86_64__)

static inline uint64_t load64(const unsigned char *p)
{
    uint64_t word;
    memcpy(&word, p, 8);
    return word;
}

/* Runs three streams over adjacent blocks of block_len bytes for as long as three
 * blocks remain, then merges them: crc0 is shifted past the second block and xored with
 * its crc, and again for the third. Inlined, so block_len is a constant in the loop. */
__attribute__((target("sse4.2"), always_inline)) static inline uint64_t
sse42_three_streams(uint64_t crc0, const unsigned char **data, size_t *len, size_t block_len,
                    const uint32_t shift_table[4][256])
{
    const unsigned char *next = *data;
    while (*len >= 3 * block_len) {
        uint64_t crc1 = 0, crc2 = 0;
        const unsigned char *end = next + block_len;
        do {
            crc0 = _mm_crc32_u64(crc0, load64(next));
            crc1 = _mm_crc32_u64(crc1, load64(next + block_len));
            crc2 = _mm_crc32_u64(crc2, load64(next + 2 * block_len));
            next += 8;
        } while (next < end);
        crc0 = shift_crc(shift_table, (uint32_t)crc0) ^ (uint32_t)crc1;
        crc0 = shift_crc(shift_table, (uint32_t)crc0) ^ (uint32_t)crc2;
        next += 2 * block_len;
        *len -= 3 * block_len;
    }
    *data = next;
    return crc0;
}

__attribute__((target("sse4.2"))) static uint32_t crc32c_sse42(uint32_t crc, const void *data,
                                                               size_t len)
{
    const unsigned char *next = data;
    uint64_t crc0 = crc ^ 0xFFFFFFFFu; /* 64 bits wide because _mm_crc32_u64 wants it */

    while (len && ((uintptr_t)next & 7)) {
        crc0 = _mm_crc32_u8((uint32_t)crc0, *next++);
        len--;
    }
    crc0 = sse42_three_streams(crc0, &next, &len, LONG_BLOCK, long_shift);
    crc0 = sse42_three_streams(crc0, &next, &len, SHORT_BLOCK, short_shift);
    while (len >= 8) {
        crc0 = _mm_crc32_u64(crc0, load64(next));
        next += 8;
        len -= 8;
    }
    while (len--)
        crc0 = _mm_crc32_u8((uint32_t)crc0, *next++);
    return (uint32_t)crc0 ^ 0xFFFFFFFFu;
}

static crc32c_fn detect_hardware(const char **name)
{
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("sse4.2"))
        return NULL;
    *name = "sse4.2";
    return crc32c_sse42;
}

#elif defined(__aarch64__)

/* One stream of __crc32cd; untested here (no aarch64 machine), kept deliberately simple. */
__attribute__((target("+crc"))) static uint32_t crc32c_armv8(uint32_t crc, const void *data,
                                                             size_t len)
{
    const unsigned char *next = data;
    uint32_t reg = crc ^ 0xFFFFFFFFu;

    while (len && ((uintptr_t)next & 7)) {
        reg = __crc32cb(reg, *next++);
        len--;
    }
    while (len >= 8) {
        uint64_t word;
        memcpy(&word, next, 8);
        reg = __crc32cd(reg, word);
        next += 8;
        len -= 8;
    }
    while (len--)
        reg = __crc32cb(reg, *next++);
    return reg ^ 0xFFFFFFFFu;
}

static crc32c_fn detect_hardware(const char **name)
{
#if defined(__linux__)
    if (!(getauxval(AT_HWCAP) & HWCAP_CRC32))
        return NULL;
#elif !defined(__APPLE__) /* every Apple arm64 CPU has the CRC extension */
    return NULL;
#endif
    *name = "armv8-crc";
    return crc32c_armv8;
}

#else

static crc32c_fn detect_hardware(const char **name)
{
    (void)name;
    return NULL;
}

#endif

void crc32c_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t reg = n;
        for (int bit = 0; bit < 8; bit++)
            reg = (reg & 1) ? (reg >> 1) ^ CRC32C_POLY : reg >> 1;
        sw_table[0][n] = reg;
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int k = 1; k < 8; k++)
            sw_table[k][n] = sw_table[0][sw_table[k - 1][n] & 0xff] ^ (sw_table[k - 1][n] >> 8);

    uint32_t power = (uint32_t)1 << 30; /* x^1 */
    x2n_table[0] = power;
    for (int k = 1; k < X2N_COUNT; k++)
        x2n_table[k] = power = multmodp(power, power);

    build_shift_table(long_shift, LONG_BLOCK);
    build_shift_table(short_shift, SHORT_BLOCK);

    hw_impl = detect_hardware(&hardware_name);
    best_impl = hw_impl ? hw_impl : crc32c_update_sw;
}

const char *crc32c_hardware(void)
{
    return hardware_name;
}

int crc32c_hw_available(void)
{
    return hw_impl != NULL;
}

uint32_t crc32c_update(uint32_t crc, const void *data, size_t len)
{
    return best_impl(crc, data, len);
}

uint32_t crc32c_update_hw(uint32_t crc, const void *data, size_t len)
{
    return hw_impl(crc, data, len);
}
