/* bf16 helpers shared by Hearth's native kernels (a bf16 is the top half of an fp32). */
#ifndef HEARTH_BF16_H
#define HEARTH_BF16_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* fp32 -> bf16, round to nearest even; NaN stays NaN (quiet). */
static inline uint16_t to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static inline float bf16_to_float(uint16_t value) {
    const uint32_t bits = (uint32_t)value << 16;
    float result;
    memcpy(&result, &bits, sizeof result);
    return result;
}

/* 16 bf16 -> 16 fp32 lanes. */
static inline __m512 load_bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

#endif
