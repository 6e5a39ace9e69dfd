/* GF(2^8) multiply-accumulate over byte regions, in the style of ISA-L: a product by a
   constant is two 16-entry table lookups (the low and high nibbles of each byte), done 32
   bytes at a time with AVX2's vpshufb, 16 with SSSE3's pshufb, else one byte at a time.
   The choice is made once, at run time, from what the CPU supports. */
#include "gf256.h"

#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define GF_X86 1
#endif

uint8_t gf256_mul(uint8_t a, uint8_t b)
{
    uint8_t product = 0;
    while (b) {
        if (b & 1)
            product ^= a;
        a = (uint8_t)((a << 1) ^ ((a & 0x80) ? 0x1d : 0));
        b >>= 1;
    }
    return product;
}

/* low[j] = coef * j, high[j] = coef * (j << 4), for j < 16. */
static void nibble_tables(uint8_t coef, uint8_t low[16], uint8_t high[16])
{
    for (int j = 0; j < 16; j++) {
        low[j] = gf256_mul(coef, (uint8_t)j);
        high[j] = gf256_mul(coef, (uint8_t)(j << 4));
    }
}

static void muladd_scalar(uint8_t *dst, const uint8_t *src, size_t n, const uint8_t low[16],
                          const uint8_t high[16])
{
    for (size_t i = 0; i < n; i++)
        dst[i] ^= (uint8_t)(low[src[i] & 0x0f] ^ high[src[i] >> 4]);
}

#ifdef GF_X86
__attribute__((target("avx2"))) static size_t xor_avx2(uint8_t *dst, const uint8_t *src, size_t n)
{
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(src + i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(src + i + 32));
        __m256i c = _mm256_loadu_si256((const __m256i *)(dst + i));
        __m256i d = _mm256_loadu_si256((const __m256i *)(dst + i + 32));
        _mm256_storeu_si256((__m256i *)(dst + i), _mm256_xor_si256(a, c));
        _mm256_storeu_si256((__m256i *)(dst + i + 32), _mm256_xor_si256(b, d));
    }
    return i;
}

__attribute__((target("avx2"))) static size_t muladd_avx2(uint8_t *dst, const uint8_t *src,
                                                          size_t n, const uint8_t low[16],
                                                          const uint8_t high[16])
{
    const __m256i lo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)low));
    const __m256i hi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)high));
    const __m256i mask = _mm256_set1_epi8(0x0f);
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i s = _mm256_loadu_si256((const __m256i *)(src + i));
        __m256i d = _mm256_loadu_si256((const __m256i *)(dst + i));
        __m256i l = _mm256_shuffle_epi8(lo, _mm256_and_si256(s, mask));
        __m256i h = _mm256_shuffle_epi8(hi, _mm256_and_si256(_mm256_srli_epi64(s, 4), mask));
        _mm256_storeu_si256((__m256i *)(dst + i), _mm256_xor_si256(d, _mm256_xor_si256(l, h)));
    }
    return i;
}

__attribute__((target("ssse3"))) static size_t muladd_ssse3(uint8_t *dst, const uint8_t *src,
                                                            size_t n, const uint8_t low[16],
                                                            const uint8_t high[16])
{
    const __m128i lo = _mm_loadu_si128((const __m128i *)low);
    const __m128i hi = _mm_loadu_si128((const __m128i *)high);
    const __m128i mask = _mm_set1_epi8(0x0f);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m128i s = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i d = _mm_loadu_si128((const __m128i *)(dst + i));
        __m128i l = _mm_shuffle_epi8(lo, _mm_and_si128(s, mask));
        __m128i h = _mm_shuffle_epi8(hi, _mm_and_si128(_mm_srli_epi64(s, 4), mask));
        _mm_storeu_si128((__m128i *)(dst + i), _mm_xor_si128(d, _mm_xor_si128(l, h)));
    }
    return i;
}
#endif

void gf256_muladd(uint8_t *dst, const uint8_t *src, size_t n, uint8_t coef)
{
    if (coef == 0 || n == 0)
        return;
    uint8_t low[16], high[16];
    nibble_tables(coef, low, high);
    size_t done = 0;
#ifdef GF_X86
    static int level = -1; /* 2: AVX2, 1: SSSE3, 0: neither; racy but idempotent */
    if (level < 0)
        level = __builtin_cpu_supports("avx2") ? 2 : __builtin_cpu_supports("ssse3") ? 1 : 0;
    if (level == 2 && coef == 1)
        done = xor_avx2(dst, src, n); /* xor parity: no tables */
    else if (level == 2)
        done = muladd_avx2(dst, src, n, low, high);
    else if (level == 1)
        done = muladd_ssse3(dst, src, n, low, high);
#endif
    muladd_scalar(dst + done, src + done, n - done, low, high);
}
