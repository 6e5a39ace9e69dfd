/* CRC-32C (Castagnoli, reflected, init and xorout 0xFFFFFFFF).
 *
 * Every function takes and returns a finished crc (0 for the empty string), like
 * zlib's crc32(), so calls chain: crc32c_update(crc32c_update(0, a, na), b, nb) is the
 * crc of a followed by b. crc32c_init() must run once before any other call. */
#ifndef MTCKPT_CRC32C_H
#define MTCKPT_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Builds the lookup tables and picks the hardware path if the CPU has one. */
void crc32c_init(void);

/* "sse4.2", "armv8-crc" or "none": the path crc32c_update() dispatches to. */
const char *crc32c_hardware(void);

/* Nonzero when crc32c_update_hw() may be called. */
int crc32c_hw_available(void);

/* The fastest path this CPU has. */
uint32_t crc32c_update(uint32_t crc, const void *data, size_t len);

/* Portable slicing-by-8 tables; always available. */
uint32_t crc32c_update_sw(uint32_t crc, const void *data, size_t len);

/* The CPU's CRC-32C instruction; only when crc32c_hw_available(). */
uint32_t crc32c_update_hw(uint32_t crc, const void *data, size_t len);

/* The crc of A followed by B, from crc(A), crc(B) and len(B). */
uint32_t crc32c_combine(uint32_t crc1, uint32_t crc2, uint64_t len2);

#endif /* MTCKPT_CRC32C_H */
