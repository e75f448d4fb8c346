/* Hearth's int8 linear for x86-64 CPUs with AVX-512: Y[M, N] = (X[M, K] @ Q[N, K]^T) * scale[N].
 *
 * Q holds int8 weights with one fp32 scale per output row (the int8 per-channel format of
 * model/quant_kernels.py); X and Y are bf16. Same design as linear_bf16.c: the weights are
 * packed once into tiles of 4 output rows, [ceil(N/4)][Kp/16][4][16] with Kp = K rounded up
 * to 16 and zero padding, so a thread reads its weights as one sequential stream (one cache
 * line per 16 columns of a tile). X is widened to fp32 once per call, into a zero-padded
 * buffer, so the inner loop is a load, a sign extension, a conversion and one FMA per row.
 *
 * Arithmetic: Y[m, n] is one fp32 accumulator over K in 16-wide chunks, in order, a fixed-
 * order lane sum, times scale[n], rounded to bf16 (nearest even). Nothing else in the batch
 * takes part, so a row's result does not depend on the row count (batch invariance).
 */
#include "bf16.h"

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE_N 4
#define CHUNK_K 16
#define BLOCK_TILES 16

#define LOAD_W(w)                                                                                   \
    __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w))));      \
    __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + 16)))); \
    __m512 w2 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + 32)))); \
    __m512 w3 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + 48))))
#define FMA_ROW(a, xv)                                                                              \
    a##0 = _mm512_fmadd_ps(w0, xv, a##0); a##1 = _mm512_fmadd_ps(w1, xv, a##1);                       \
    a##2 = _mm512_fmadd_ps(w2, xv, a##2); a##3 = _mm512_fmadd_ps(w3, xv, a##3)
#define STORE_ROW(a, out)                                                                           \
    do { uint16_t *o = (out); o[0] = to_bf16(_mm512_reduce_add_ps(a##0) * scale[0]);                \
         if (num_out > 1) o[1] = to_bf16(_mm512_reduce_add_ps(a##1) * scale[1]);                    \
         if (num_out > 2) o[2] = to_bf16(_mm512_reduce_add_ps(a##2) * scale[2]);                    \
         if (num_out > 3) o[3] = to_bf16(_mm512_reduce_add_ps(a##3) * scale[3]); } while (0)

/* 4 weight rows against 4 rows of X (fp32, row stride k_padded): 16 accumulators in registers.
 * With `ahead` (else NULL), each chunk also prefetches its cache line at the same place in the
 * next block of tiles (see hearth_linear_int8). */
static void tile_4rows(const float *x, int64_t k_padded, const int8_t *w, const float *scale, uint16_t *y,
                       int64_t ldy, int64_t num_out, const int8_t *ahead) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    __m512 c0 = a0, c1 = a0, c2 = a0, c3 = a0, d0 = a0, d1 = a0, d2 = a0, d3 = a0;
    const int8_t *ahead_start = w;
    for (int64_t k = 0; k < k_padded; k += CHUNK_K, w += TILE_N * CHUNK_K) {
        if (ahead) _mm_prefetch((const char *)(ahead + (w - ahead_start)), _MM_HINT_T1);
        LOAD_W(w);
        __m512 xa = _mm512_loadu_ps(x + k), xb = _mm512_loadu_ps(x + k_padded + k);
        __m512 xc = _mm512_loadu_ps(x + 2 * k_padded + k), xd = _mm512_loadu_ps(x + 3 * k_padded + k);
        FMA_ROW(a, xa); FMA_ROW(b, xb); FMA_ROW(c, xc); FMA_ROW(d, xd);
    }
    STORE_ROW(a, y); STORE_ROW(b, y + ldy); STORE_ROW(c, y + 2 * ldy); STORE_ROW(d, y + 3 * ldy);
}

/* The same for one row of X: each accumulator sees the same operations in the same order. */
static void tile_1row(const float *x, int64_t k_padded, const int8_t *w, const float *scale, uint16_t *y,
                      int64_t num_out) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < k_padded; k += CHUNK_K, w += TILE_N * CHUNK_K) {
        LOAD_W(w);
        __m512 xa = _mm512_loadu_ps(x + k);
        FMA_ROW(a, xa);
    }
    STORE_ROW(a, y);
}

/* bf16 [M, K] (row stride ldx) -> fp32 [M, k_padded], zeros past K (a bf16 is the top half of its fp32). */
static void widen(const uint16_t *x, int64_t ldx, float *out, int64_t m_size, int64_t k_size, int64_t k_padded) {
    for (int64_t m = 0; m < m_size; m++) {
        for (int64_t k = 0; k < k_padded; k += CHUNK_K) {
            const __mmask16 mask = k + CHUNK_K <= k_size ? 0xffff : k < k_size ? (__mmask16)((1u << (k_size - k)) - 1) : 0;
            __m256i halves = _mm256_maskz_loadu_epi16(mask, x + m * ldx + k);
            _mm512_storeu_ps(out + m * k_padded + k, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16)));
        }
    }
}

/* Returns 0, or -1 when the fp32 copy of X could not be allocated. */
int hearth_linear_int8(const uint16_t *x, int64_t ldx, const int8_t *w_packed, const float *scales, uint16_t *y,
                       int64_t ldy, int64_t m_size, int64_t n_size, int64_t k_size, int num_threads) {
    const int64_t num_tiles = (n_size + TILE_N - 1) / TILE_N;
    const int64_t num_blocks = (num_tiles + BLOCK_TILES - 1) / BLOCK_TILES;
    const int64_t k_padded = (k_size + CHUNK_K - 1) / CHUNK_K * CHUNK_K;
    float *x_wide = aligned_alloc(64, (size_t)((m_size * k_padded * sizeof(float) + 63) / 64 * 64));
    if (!x_wide) return -1;
    widen(x, ldx, x_wide, m_size, k_size, k_padded);
    #pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t block = 0; block < num_blocks; block++) {
        const int64_t first_tile = block * BLOCK_TILES;
        const int64_t end_tile = first_tile + BLOCK_TILES < num_tiles ? first_tile + BLOCK_TILES : num_tiles;
        for (int64_t m = 0; m < m_size; m += 4) {
            const float *x_rows = x_wide + m * k_padded;
            for (int64_t t = first_tile; t < end_tile; t++) {
                const int8_t *w_tile = w_packed + t * TILE_N * k_padded;
                const int64_t n = t * TILE_N;
                uint16_t *y_tile = y + m * ldy + n;
                if (m + 4 <= m_size) {
                    /* The first 4-row slice waits on memory; the second computes from L2 with memory
                     * idle, so it prefetches the next block into L2 (as linear_bf16.c). Same bits. */
                    const int8_t *ahead = m == 4 && block + 1 < num_blocks ? w_tile + BLOCK_TILES * TILE_N * k_padded : NULL;
                    tile_4rows(x_rows, k_padded, w_tile, scales + n, y_tile, ldy, n_size - n, ahead);
                } else {
                    for (int64_t row = 0; m + row < m_size; row++)
                        tile_1row(x_rows + row * k_padded, k_padded, w_tile, scales + n, y_tile + row * ldy, n_size - n);
                }
            }
        }
    }
    free(x_wide);
    return 0;
}
