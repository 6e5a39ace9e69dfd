/* GF(2^8) region arithmetic for the erasure codes (XOR and Reed-Solomon parity). */
#ifndef MTCKPT_GF256_H
#define MTCKPT_GF256_H

#include <stddef.h>
#include <stdint.h>

/* dst[i] ^= coef * src[i] in GF(2^8) with the polynomial x^8 + x^4 + x^3 + x^2 + 1 (0x11d),
   for i < n. coef 1 is a plain XOR; coef 0 leaves dst as it is. */
void gf256_muladd(uint8_t *dst, const uint8_t *src, size_t n, uint8_t coef);

/* The product of two field elements (for tables and tests). */
uint8_t gf256_mul(uint8_t a, uint8_t b);

#endif
