/* Hearth's int8 linear: Y[M, N] = X[M, K] @ (Q[N, K] * scale)^T. Two paths, one per kind of CPU:
 * - AVX-512 BF16 (the first part below): X and Y bf16, one scale per output row;
 * - the fp32 path (vec.h: AVX2 + FMA, ARM64 NEON; the second part): X and Y fp32, a scale per
 *   output row or per group of input columns (GGUF's Q8_0 is groups of 32).
 *
 * The AVX-512 BF16 path: Y[M, N] = (X[M, K] @ Q[N, K]^T) * scale[N].
 *
 * Q holds int8 weights with one fp32 scale per output row (the int8 per-channel format of
 * model/quant_kernels.py); X and Y are bf16. Same design as linear_bf16.c: the weights are
 * packed once into tiles of 4 output rows, [ceil(N/4)][Kp/32][4][32] with Kp = K rounded up
 * to 32 and zero padding, so a thread reads its weights as one sequential stream. An int8 is
 * exact in bf16 (|q| <= 127 needs 7 bits), so each 32 codes of a row become one bf16 vector
 * (sign extension, conversion to fp32, then to bf16: exact) and meet X, bf16 as it is, through
 * `vdpbf16ps`, as the bf16 kernel's weights do: the conversion is shared by every row of X,
 * so several rows cost little more than one.
 *
 * Arithmetic: Y[m, n] is one fp32 accumulator fed by `vdpbf16ps` over K in 32-wide chunks, in
 * order (the products are exact), a fixed-order lane sum, times scale[n], rounded to bf16
 * (nearest even). Nothing else in the batch takes part, so a row's result does not depend on
 * the row count (batch invariance).
 */
#if defined(__AVX512BF16__)
#include "bf16.h"

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define TILE_N 4
#define CHUNK_K 32
#define BLOCK_TILES 16

/* 32 int8 codes -> 32 bf16 (exact): widened to fp32 in two halves, then packed to bf16. */
static inline __m512bh codes_to_bf16(const int8_t *codes) {
    const __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)codes)));
    const __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(codes + 16))));
    return _mm512_cvtne2ps_pbh(high, low);
}

static inline __mmask32 tail_mask(int64_t k, int64_t k_size) {
    return k + CHUNK_K <= k_size ? 0xffffffffu : (__mmask32)((1ull << (k_size - k)) - 1);
}

#define LOAD_W(w)                                                                                  \
    const __m512bh w0 = codes_to_bf16(w), w1 = codes_to_bf16(w + 32), w2 = codes_to_bf16(w + 64), \
                   w3 = codes_to_bf16(w + 96)
#define DOT_ROW(a, xv)                                                                             \
    a##0 = _mm512_dpbf16_ps(a##0, w0, xv); a##1 = _mm512_dpbf16_ps(a##1, w1, xv);                  \
    a##2 = _mm512_dpbf16_ps(a##2, w2, xv); a##3 = _mm512_dpbf16_ps(a##3, w3, xv)
#define STORE_ROW(a, out)                                                                          \
    do { uint16_t *o = (out); o[0] = to_bf16(_mm512_reduce_add_ps(a##0) * scale[0]);               \
         if (num_out > 1) o[1] = to_bf16(_mm512_reduce_add_ps(a##1) * scale[1]);                   \
         if (num_out > 2) o[2] = to_bf16(_mm512_reduce_add_ps(a##2) * scale[2]);                   \
         if (num_out > 3) o[3] = to_bf16(_mm512_reduce_add_ps(a##3) * scale[3]); } while (0)

/* 4 weight rows against 4 rows of X: 16 accumulators in registers (written out: the generic
 * tile_rows spills at 4 rows). With `ahead` (else NULL), each chunk also prefetches its two cache
 * lines at the same place in the next block of tiles (see hearth_linear_int8). */
static void tile_4rows(const uint16_t *x, int64_t ldx, const int8_t *w, const float *scale, uint16_t *y,
                       int64_t ldy, int64_t num_out, int64_t k_size, const int8_t *ahead) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    __m512 c0 = a0, c1 = a0, c2 = a0, c3 = a0, d0 = a0, d1 = a0, d2 = a0, d3 = a0;
    for (int64_t k = 0; k < k_size; k += CHUNK_K, w += TILE_N * CHUNK_K) {
        if (ahead) {
            _mm_prefetch((const char *)ahead, _MM_HINT_T1);
            _mm_prefetch((const char *)(ahead + 64), _MM_HINT_T1);
            ahead += TILE_N * CHUNK_K;
        }
        const __mmask32 mask = tail_mask(k, k_size);
        LOAD_W(w);
        const __m512bh xa = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + k);
        const __m512bh xb = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + ldx + k);
        const __m512bh xc = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + 2 * ldx + k);
        const __m512bh xd = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + 3 * ldx + k);
        DOT_ROW(a, xa); DOT_ROW(b, xb); DOT_ROW(c, xc); DOT_ROW(d, xd);
    }
    STORE_ROW(a, y); STORE_ROW(b, y + ldy); STORE_ROW(c, y + 2 * ldy); STORE_ROW(d, y + 3 * ldy);
}

/* One tile (4 weight rows) against 1-3 rows of X (row stride ldx): 4 * nr accumulators, the
 * same operations per output as tile_4rows. Called with constants, so the loops unroll; the
 * codes are converted once for all nr rows. */
static inline __attribute__((always_inline)) void tile_rows(
    const int nr, const uint16_t *x, int64_t ldx, const int8_t *w, const float *scale, uint16_t *y, int64_t ldy,
    int64_t num_out, int64_t k_size) {
    __m512 acc[3][TILE_N];
    for (int r = 0; r < nr; r++)
        for (int n = 0; n < TILE_N; n++) acc[r][n] = _mm512_setzero_ps();
    for (int64_t k = 0; k < k_size; k += CHUNK_K, w += TILE_N * CHUNK_K) {
        const __mmask32 mask = tail_mask(k, k_size);
        __m512bh weights[TILE_N];
        for (int n = 0; n < TILE_N; n++) weights[n] = codes_to_bf16(w + n * CHUNK_K);
        for (int r = 0; r < nr; r++) {
            const __m512bh xr = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + r * ldx + k);
            for (int n = 0; n < TILE_N; n++) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], weights[n], xr);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int n = 0; n < TILE_N && n < num_out; n++)
            y[r * ldy + n] = to_bf16(_mm512_reduce_add_ps(acc[r][n]) * scale[n]);
}

/* group_size: 0 or k_size (one scale per output row) on this path. Returns 0, or -2 for groups. */
int hearth_linear_int8(const uint16_t *x, int64_t ldx, const int8_t *w_packed, const float *scales, uint16_t *y,
                       int64_t ldy, int64_t m_size, int64_t n_size, int64_t k_size, int64_t group_size,
                       int num_threads) {
    if (group_size && group_size != k_size) return -2;
    const int64_t num_tiles = (n_size + TILE_N - 1) / TILE_N;
    const int64_t num_blocks = (num_tiles + BLOCK_TILES - 1) / BLOCK_TILES;
    const int64_t k_padded = (k_size + CHUNK_K - 1) / CHUNK_K * CHUNK_K;
    #pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t block = 0; block < num_blocks; block++) {
        const int64_t first_tile = block * BLOCK_TILES;
        const int64_t end_tile = first_tile + BLOCK_TILES < num_tiles ? first_tile + BLOCK_TILES : num_tiles;
        for (int64_t m = 0; m < m_size; m += 4) {
            const uint16_t *x_rows = x + m * ldx;
            for (int64_t t = first_tile; t < end_tile; t++) {
                const int8_t *w_tile = w_packed + t * TILE_N * k_padded;
                const int64_t n = t * TILE_N;
                uint16_t *y_tile = y + m * ldy + n;
                /* The first 4-row slice waits on memory; the second computes from L2 with memory
                 * idle, so it prefetches the next block into L2 (as linear_bf16.c): 3-10% at 8-32 rows. Same bits. */
                const int8_t *ahead = m == 4 && m + 4 <= m_size && t + BLOCK_TILES < num_tiles
                                          ? w_tile + BLOCK_TILES * TILE_N * k_padded : NULL;
                switch (m_size - m < 4 ? m_size - m : 4) {
                case 4: tile_4rows(x_rows, ldx, w_tile, scales + n, y_tile, ldy, n_size - n, k_size, ahead); break;
                case 3: tile_rows(3, x_rows, ldx, w_tile, scales + n, y_tile, ldy, n_size - n, k_size); break;
                case 2: tile_rows(2, x_rows, ldx, w_tile, scales + n, y_tile, ldy, n_size - n, k_size); break;
                default: tile_rows(1, x_rows, ldx, w_tile, scales + n, y_tile, ldy, n_size - n, k_size);
                }
            }
        }
    }
    return 0;
}

#else /* the fp32 path: X and Y fp32 */
#include "vec.h"

/* Layout: tiles of 32 output rows (4 vectors of 8 lanes, a lane an output row), each tile
 * [K][32] int8 (column by column: one 8-byte load is 8 rows of one column), streamed once per 1-4
 * rows of X; scales [tiles][groups][32] fp32 (one group of K columns for a scale per row).
 *
 * Arithmetic: per group, two fp32 accumulators (even and odd columns, fused multiply-adds in
 * column order, the int8 codes widened to fp32 exactly), added; y = fma(scale, that, y) over the
 * groups in order (one group: y = scale * sum). The same steps for every row count, so a row's
 * result is batch invariant. K and the group size must be even. */
#define TILE_ROWS 32
#define TILE_VECS 4

/* Vectors v0..v0 + nv - 1 of one tile against nr rows of X (constants: unrolled, in registers). */
static inline __attribute__((always_inline)) void int8_block(
    const int nv, const int nr, const float *x, int64_t ldx, const int8_t *w, const float *scales, const int v0,
    float *y, int64_t ldy, int64_t num_out, int64_t k_size, int64_t group_size) {
    vf acc[TILE_VECS][4];
    for (int v = 0; v < nv; v++)
        for (int r = 0; r < nr; r++) acc[v][r] = vf_zero();
    for (int64_t g = 0; g < k_size / group_size; g++) {
        vf even[TILE_VECS][4], odd[TILE_VECS][4];
        for (int v = 0; v < nv; v++)
            for (int r = 0; r < nr; r++) even[v][r] = odd[v][r] = vf_zero();
        for (int64_t k = g * group_size; k < (g + 1) * group_size; k += 2) {
            for (int v = 0; v < nv; v++) {
                const vf low = vf_from_int8(w + k * TILE_ROWS + 8 * (v0 + v));
                const vf high = vf_from_int8(w + (k + 1) * TILE_ROWS + 8 * (v0 + v));
                for (int r = 0; r < nr; r++) {
                    even[v][r] = vf_fma(low, vf_set1(x[r * ldx + k]), even[v][r]);
                    odd[v][r] = vf_fma(high, vf_set1(x[r * ldx + k + 1]), odd[v][r]);
                }
            }
        }
        for (int v = 0; v < nv; v++) {
            const vf scale = vf_load(scales + g * TILE_ROWS + 8 * (v0 + v));
            for (int r = 0; r < nr; r++) acc[v][r] = vf_fma(scale, vf_add(even[v][r], odd[v][r]), acc[v][r]);
        }
    }
    for (int v = 0; v < nv; v++)
        for (int r = 0; r < nr; r++) store_outputs(y + r * ldy + 8 * (v0 + v), acc[v][r], num_out - 8 * (v0 + v));
}

/* group_size 0 means one scale per output row. Returns 0, or -2 when K or the group size is odd
 * or the group size does not divide K. */
int hearth_linear_int8(const float *x, int64_t ldx, const int8_t *w_packed, const float *scales, float *y,
                       int64_t ldy, int64_t m_size, int64_t n_size, int64_t k_size, int64_t group_size,
                       int num_threads) {
    if (!group_size) group_size = k_size;
    if (k_size % 2 || group_size % 2 || k_size % group_size) return -2;
    const int64_t num_tiles = (n_size + TILE_ROWS - 1) / TILE_ROWS, num_groups = k_size / group_size;
    const int64_t block_tiles = tiles_per_block(m_size, k_size * TILE_ROWS);
    const int64_t num_blocks = (num_tiles + block_tiles - 1) / block_tiles;
    #pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t block = 0; block < num_blocks; block++) {
        const int64_t first = block * block_tiles, end = first + block_tiles < num_tiles ? first + block_tiles : num_tiles;
        for (int64_t m = 0; m < m_size; m += 4) {
            const float *xm = x + m * ldx;
            for (int64_t t = first; t < end; t++) {
                const int8_t *w = w_packed + t * k_size * TILE_ROWS;
                const float *s = scales + t * num_groups * TILE_ROWS;
                const int64_t n = t * TILE_ROWS;
                if (m + 4 <= m_size)
                    for (int v = 0; v < TILE_VECS; v++)
                        int8_block(1, 4, xm, ldx, w, s, v, y + m * ldy + n, ldy, n_size - n, k_size, group_size);
                else
                    for (int64_t r = 0; m + r < m_size; r++)
                        int8_block(TILE_VECS, 1, xm + r * ldx, ldx, w, s, 0, y + (m + r) * ldy + n, ldy, n_size - n,
                                   k_size, group_size);
            }
        }
    }
    return 0;
}
#endif
