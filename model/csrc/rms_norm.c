/* Hearth's RMSNorm. Two paths, one per kind of CPU: AVX-512 BF16 (the first part below, bf16 rows:
 * y = weight * bf16(x * rsqrt(mean(x^2) + eps))) and the fp32 path (vec.h: AVX2 + FMA, ARM64 NEON;
 * the second part, fp32 rows and weight: y = weight * (x * rsqrt(mean(x^2) + eps))).
 *
 * Why it exists: the PyTorch module is nine small ops (cast, square, mean, add, rsqrt,
 * multiply, cast, multiply), ~25 us a call for one decode row, 25 calls a step.
 *
 * Arithmetic: the same steps and roundings as model.decoder.RMSNorm (normalise in fp32,
 * round to bf16, multiply by the bf16 weight, round again), with the sum of squares in a
 * fixed order (16 lanes over the row, then a fixed lane sum), so a row's result depends
 * on that row only. dim must be a multiple of 16.
 */
#if defined(__AVX512BF16__)
#include "bf16.h"

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* x: rows x dim (row stride ldx), weight: dim, y: rows x dim contiguous. Returns -2 when dim % 16. */
int hearth_rms_norm(const uint16_t *x, int64_t ldx, const uint16_t *weight, uint16_t *y, int64_t rows, int64_t dim,
                    float eps, int num_threads) {
    if (dim % 16) return -2;
    #pragma omp parallel for num_threads(num_threads) schedule(static) if (rows > 32)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *row = x + r * ldx;
        __m512 squares = _mm512_setzero_ps();
        for (int64_t d = 0; d < dim; d += 16) {
            __m512 v = load_bf16x16(row + d);
            squares = _mm512_fmadd_ps(v, v, squares);
        }
        const float inverse_rms = 1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)dim + eps);
        const __m512 scale = _mm512_set1_ps(inverse_rms);
        for (int64_t d = 0; d < dim; d += 16) {
            uint16_t normed_bf16[16];
            _mm256_storeu_si256((__m256i *)normed_bf16, to_bf16x16(_mm512_mul_ps(load_bf16x16(row + d), scale)));
            __m512 product = _mm512_mul_ps(load_bf16x16(normed_bf16), load_bf16x16(weight + d));
            _mm256_storeu_si256((__m256i *)(y + r * dim + d), to_bf16x16(product));
        }
    }
    return 0;
}

#else /* the fp32 path */
#include "vec.h"

#include <math.h>

/* x: rows x dim fp32 (row stride ldx), weight: dim fp32, y: rows x dim contiguous. The sum of
 * squares in 8 lanes over the row then vf_sum; each product rounded once, as the module's fp32
 * ops. Returns -2 when dim is not a multiple of 8. */
int hearth_rms_norm(const float *x, int64_t ldx, const float *weight, float *y, int64_t rows, int64_t dim, float eps,
                    int num_threads) {
    if (dim % 8) return -2;
    #pragma omp parallel for num_threads(num_threads) schedule(static) if (rows > 32)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * ldx;
        vf squares = vf_zero();
        for (int64_t d = 0; d < dim; d += 8) squares = vf_fma(vf_load(row + d), vf_load(row + d), squares);
        const vf scale = vf_set1(1.0f / sqrtf(vf_sum(squares) / (float)dim + eps));
        for (int64_t d = 0; d < dim; d += 8)
            vf_store(y + r * dim + d, vf_mul(vf_load(weight + d), vf_mul(vf_load(row + d), scale)));
    }
    return 0;
}
#endif
