/* Hearth's int4 linear: Y[M, N] = X[M, K] @ W[N, K]^T, where W = (q - 8) * scale + zero per group
 * of `group_size` input columns (model/quant_kernels.py's int4 format: codes q in 0..15, bf16
 * scales and zeros per output row and group). Two paths, one per kind of CPU:
 * - AVX-512 BF16 (the first part below): X and Y bf16, `vdpbf16ps`;
 * - the fp32 path (vec.h: AVX2 + FMA, ARM64 NEON; the second part): X and Y fp32.
 *
 * The AVX-512 BF16 path:
 *
 * Why it exists: an int4 decode step reads 0.625 bytes a weight, a quarter of bf16's, but
 * PyTorch's `_weight_int4pack_mm_for_cpu` streams them at ~14-19 GB/s here (bench_decode_step.py),
 * so int4 decoded no faster than int8. This kernel needs no dequantized weight and no lane sums:
 *
 * - Lanes are output rows: a tile is 16 rows. Tiles go in quads (64 rows), packed once so that a
 *   quad is one sequential stream: group by group, for each 4 input columns, 32 bytes per tile
 *   (byte 2l + h of chunk c: row l, column 4c + h in its low nibble and 4c + 2 + h in its high one), the
 *   quad's 4 tiles side by side; after a group's codes, each tile's 16 scales and 16 zeros (bf16).
 *   (One row reads a whole quad at once, 4 accumulator sets: as one stream it ran 1.3x the same
 *   kernel over 4 separate tile streams.)
 * - A nibble becomes the bf16 of 128 + q by an OR with 0x4300 (128.0), exact; `vdpbf16ps` then
 *   takes a pair of columns of 16 rows against a broadcast pair of x. Per group and lane,
 *   dot = sum x (128 + q), so sum x w = scale * dot + (zero - 136 * scale) * sum x over the group,
 *   with sum x computed once per row and group.
 *
 * Arithmetic, for every output Y[m, n]: per group, two fp32 partial dots (even and odd column
 * pairs, each `vdpbf16ps` in column order), added; y = fma(scale, dot, y), then
 * y = fma(zero - 136 scale, sum x, y), groups in order; rounded to bf16 (nearest even). The same
 * for a quad against one row and two tiles against 4 rows, so a row's result does not depend on the row
 * count (batch invariance). The 128 + q offset costs ~1e-6 of 128 * scale * sum |x| (fp32
 * cancellation): under bf16's 4e-3 of the output unless x shares a large common part, and then
 * within a few bf16 steps (tests/test_native.py).
 * group_size must be a multiple of 32 and divide K; N is padded to 64 (a quad) in the packing.
 */
#if defined(__AVX512BF16__)
#include "bf16.h"

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE_N 16
#define QUAD 4        /* tiles */
#define BLOCK_QUADS 2 /* 128 rows: 61 KB at K = 768 with group 32 */

/* Bytes of one group of one quad: 4 tiles' codes (16 rows x group_size / 2) and scales and zeros. */
static inline int64_t quad_group_bytes(int64_t group_size) { return QUAD * (group_size * TILE_N / 2 + 2 * TILE_N * 2); }

static inline __m512bh broadcast_pair(const uint16_t *x) {
    int32_t pair;
    memcpy(&pair, x, sizeof pair);
    return (__m512bh)_mm512_set1_epi32(pair);
}

/* Tiles first..first + nt - 1 of a quad against `nr` rows of X: nt * nr outputs of 16 lanes.
 * Called with constants, so the loops unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void int4_block(
    const int nt, const int nr, const uint16_t *x, int64_t ldx, const float *sums, int64_t num_groups,
    int64_t group_size, const uint8_t *quad, int first, uint16_t *y, int64_t ldy, int64_t num_out) {
    const int64_t chunks = group_size / 4, stride = quad_group_bytes(group_size);
    const __m512i nibble = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4300);
    __m512 acc[4][4];
    for (int t = 0; t < nt; t++)
        for (int r = 0; r < nr; r++) acc[t][r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < num_groups; g++) {
        __m512 even[4][4], odd[4][4];
        for (int t = 0; t < nt; t++)
            for (int r = 0; r < nr; r++) even[t][r] = odd[t][r] = _mm512_setzero_ps();
        const uint16_t *xg = x + g * group_size;
        for (int64_t c = 0; c < chunks; c++) {
            __m512bh xa[4], xb[4];
            for (int r = 0; r < nr; r++) {
                xa[r] = broadcast_pair(xg + r * ldx + 4 * c);
                xb[r] = broadcast_pair(xg + r * ldx + 4 * c + 2);
            }
            for (int t = 0; t < nt; t++) {
                const uint8_t *w = quad + g * stride + 32 * (QUAD * c + first + t);
                const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)w));
                /* (v & 0xF) | 0x4300 in each 16-bit lane: bf16 128 + q */
                const __m512bh low = (__m512bh)_mm512_ternarylogic_epi32(bytes, nibble, magic, 0xEA);
                const __m512bh high = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(bytes, 4), nibble, magic, 0xEA);
                for (int r = 0; r < nr; r++) {
                    even[t][r] = _mm512_dpbf16_ps(even[t][r], low, xa[r]);
                    odd[t][r] = _mm512_dpbf16_ps(odd[t][r], high, xb[r]);
                }
            }
        }
        for (int t = 0; t < nt; t++) {
            const uint16_t *scale_zero = (const uint16_t *)(quad + g * stride + 32 * QUAD * chunks + 64 * (first + t));
            const __m512 scale = load_bf16x16(scale_zero), zero = load_bf16x16(scale_zero + TILE_N);
            const __m512 offset = _mm512_fnmadd_ps(_mm512_set1_ps(136.0f), scale, zero);
            for (int r = 0; r < nr; r++) {
                acc[t][r] = _mm512_fmadd_ps(scale, _mm512_add_ps(even[t][r], odd[t][r]), acc[t][r]);
                acc[t][r] = _mm512_fmadd_ps(offset, _mm512_set1_ps(sums[r * num_groups + g]), acc[t][r]);
            }
        }
    }
    for (int t = 0; t < nt; t++) {
        const int64_t left = num_out - t * TILE_N;
        if (left <= 0) break;
        const __mmask16 mask = left >= TILE_N ? 0xffff : (__mmask16)((1u << left) - 1);
        for (int r = 0; r < nr; r++) _mm256_mask_storeu_epi16(y + r * ldy + t * TILE_N, mask, to_bf16x16(acc[t][r]));
    }
}

/* sums[m][g] = X[m, g * group_size ...] summed in fp32, 16 lanes then a fixed lane sum. */
static void group_sums(const uint16_t *x, int64_t ldx, int64_t m_size, int64_t num_groups, int64_t group_size,
                       float *sums) {
    for (int64_t m = 0; m < m_size; m++)
        for (int64_t g = 0; g < num_groups; g++) {
            __m512 total = _mm512_setzero_ps();
            for (int64_t k = 0; k < group_size; k += 16) total = _mm512_add_ps(total, load_bf16x16(x + m * ldx + g * group_size + k));
            sums[m * num_groups + g] = _mm512_reduce_add_ps(total);
        }
}

/* One block of quads against every row: a whole quad at a time for a single row (one weight
 * stream, 4 accumulator sets); two tiles (a cache line of each chunk) of 4 rows at a time
 * otherwise, which beat one tile of 4 rows and a quad of 2 rows at 16-256 rows on cold weights;
 * rows left over go one at a time. */
static void run_block(const uint16_t *x, int64_t ldx, const float *sums, int64_t m_size, int64_t num_groups,
                      int64_t group_size, const uint8_t *w_packed, int64_t first_quad, int64_t end_quad,
                      uint16_t *y, int64_t ldy, int64_t n_size) {
    const int64_t quad_bytes = num_groups * quad_group_bytes(group_size);
    for (int64_t m = 0; m < m_size; m += 4) {
        const int64_t rows = m_size - m < 4 ? m_size - m : 4;
        for (int64_t q = first_quad; q < end_quad; q++) {
            const uint8_t *quad = w_packed + q * quad_bytes;
            const int64_t n = q * QUAD * TILE_N;
            for (int64_t r = rows == 4 ? 4 : 0; r < rows; r++)
                int4_block(4, 1, x + (m + r) * ldx, ldx, sums + (m + r) * num_groups, num_groups, group_size, quad,
                           0, y + (m + r) * ldy + n, ldy, n_size - n);
            if (rows == 4)
                for (int t = 0; t < QUAD; t += 2)
                    int4_block(2, 4, x + m * ldx, ldx, sums + m * num_groups, num_groups, group_size, quad, t,
                               y + m * ldy + n + t * TILE_N, ldy, n_size - n - t * TILE_N);
        }
    }
}

/* Returns 0, -1 when out of memory, -2 when group_size is not a multiple of 32 dividing K. */
int hearth_linear_int4(const uint16_t *x, int64_t ldx, const uint8_t *w_packed, uint16_t *y, int64_t ldy,
                       int64_t m_size, int64_t n_size, int64_t k_size, int64_t group_size, int num_threads) {
    if (group_size <= 0 || group_size % 32 || k_size % group_size) return -2;
    const int64_t num_groups = k_size / group_size;
    const int64_t num_quads = (n_size + QUAD * TILE_N - 1) / (QUAD * TILE_N);
    const int64_t num_blocks = (num_quads + BLOCK_QUADS - 1) / BLOCK_QUADS;
    float *sums = malloc((size_t)(m_size * num_groups) * sizeof(float));
    if (!sums) return -1;
    group_sums(x, ldx, m_size, num_groups, group_size, sums);
    #pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t block = 0; block < num_blocks; block++) {
        const int64_t first_quad = block * BLOCK_QUADS;
        const int64_t end_quad = first_quad + BLOCK_QUADS < num_quads ? first_quad + BLOCK_QUADS : num_quads;
        run_block(x, ldx, sums, m_size, num_groups, group_size, w_packed, first_quad, end_quad, y, ldy, n_size);
    }
    free(sums);
    return 0;
}

#else /* the fp32 path: X and Y fp32 */
#include "vec.h"

#include <stdlib.h>

/* Layout: tiles of 32 output rows (4 vectors of 8 lanes, a lane an output row); a tile is its
 * groups in order, each group_size / 8 chunks of 32 words (word l of chunk c: row l's codes for
 * columns 8c..8c + 7 of the group, column 8c + j in bits 4j..4j + 3), then the group's 32 scales
 * and 32 zeros in bf16: 0.625 bytes a weight at group 32, one sequential stream per tile.
 *
 * Arithmetic: per group and output, two fp32 accumulators (even and odd nibbles, fused
 * multiply-adds of the code as an exact fp32 0..15 against x, in column order), added;
 * y = fma(scale, dot, y), then y = fma(zero - 8 scale, sum x, y) with sum x over the group
 * computed once per row (8 lanes then a fixed lane sum); groups in order. The same steps for
 * every row count, so a row's result is batch invariant. group_size: a multiple of 32 dividing K. */
#define TILE_ROWS 32
#define TILE_VECS 4

static inline int64_t group_bytes(int64_t group_size) { return group_size / 8 * TILE_ROWS * 4 + TILE_ROWS * 4; }

/* Vectors v0..v0 + nv - 1 of one tile against nr rows of X (constants: unrolled, in registers). */
static inline __attribute__((always_inline)) void int4_block(
    const int nv, const int nr, const float *x, int64_t ldx, const float *sums, const uint8_t *tile, const int v0,
    float *y, int64_t ldy, int64_t num_out, int64_t num_groups, int64_t group_size) {
    vf acc[TILE_VECS][4];
    for (int v = 0; v < nv; v++)
        for (int r = 0; r < nr; r++) acc[v][r] = vf_zero();
    for (int64_t g = 0; g < num_groups; g++) {
        const uint32_t *codes = (const uint32_t *)(tile + g * group_bytes(group_size));
        vf even[TILE_VECS][4], odd[TILE_VECS][4];
        for (int v = 0; v < nv; v++)
            for (int r = 0; r < nr; r++) even[v][r] = odd[v][r] = vf_zero();
        for (int64_t c = 0; c < group_size / 8; c++) {
            const float *xc = x + g * group_size + 8 * c;
            for (int v = 0; v < nv; v++) {
                const vi words = vi_load(codes + c * TILE_ROWS + 8 * (v0 + v));
#define NIBBLE_PAIR(j)                                                                       \
                {                                                                            \
                    const vf q0 = VI_NIBBLE(words, j), q1 = VI_NIBBLE(words, j + 1);         \
                    for (int r = 0; r < nr; r++) {                                           \
                        even[v][r] = vf_fma(q0, vf_set1(xc[r * ldx + j]), even[v][r]);       \
                        odd[v][r] = vf_fma(q1, vf_set1(xc[r * ldx + j + 1]), odd[v][r]);     \
                    }                                                                        \
                }
                NIBBLE_PAIR(0) NIBBLE_PAIR(2) NIBBLE_PAIR(4) NIBBLE_PAIR(6)
#undef NIBBLE_PAIR
            }
        }
        const uint16_t *scale_zero = (const uint16_t *)(codes + group_size / 8 * TILE_ROWS);
        for (int v = 0; v < nv; v++) {
            const vf scale = vf_from_bf16(scale_zero + 8 * (v0 + v)), zero = vf_from_bf16(scale_zero + TILE_ROWS + 8 * (v0 + v));
            const vf offset = vf_fma(vf_set1(-8.0f), scale, zero);
            for (int r = 0; r < nr; r++) {
                acc[v][r] = vf_fma(scale, vf_add(even[v][r], odd[v][r]), acc[v][r]);
                acc[v][r] = vf_fma(offset, vf_set1(sums[r * num_groups + g]), acc[v][r]);
            }
        }
    }
    for (int v = 0; v < nv; v++)
        for (int r = 0; r < nr; r++) store_outputs(y + r * ldy + 8 * (v0 + v), acc[v][r], num_out - 8 * (v0 + v));
}

/* sums[m][g]: row m of X over group g, 8 lanes then vf_sum. */
static void group_sums(const float *x, int64_t ldx, int64_t m_size, int64_t num_groups, int64_t group_size, float *sums) {
    for (int64_t m = 0; m < m_size; m++)
        for (int64_t g = 0; g < num_groups; g++) {
            vf total = vf_zero();
            for (int64_t k = 0; k < group_size; k += 8) total = vf_add(total, vf_load(x + m * ldx + g * group_size + k));
            sums[m * num_groups + g] = vf_sum(total);
        }
}

/* Returns 0, -1 when out of memory, -2 when group_size is not a multiple of 32 dividing K. */
int hearth_linear_int4(const float *x, int64_t ldx, const uint8_t *w_packed, float *y, int64_t ldy, int64_t m_size,
                       int64_t n_size, int64_t k_size, int64_t group_size, int num_threads) {
    if (group_size <= 0 || group_size % 32 || k_size % group_size) return -2;
    const int64_t num_groups = k_size / group_size, tile_bytes = num_groups * group_bytes(group_size);
    const int64_t num_tiles = (n_size + TILE_ROWS - 1) / TILE_ROWS;
    const int64_t block_tiles = tiles_per_block(m_size, tile_bytes);
    const int64_t num_blocks = (num_tiles + block_tiles - 1) / block_tiles;
    float *sums = malloc((size_t)(m_size * num_groups) * sizeof(float));
    if (!sums) return -1;
    group_sums(x, ldx, m_size, num_groups, group_size, sums);
    #pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t block = 0; block < num_blocks; block++) {
        const int64_t first = block * block_tiles, end = first + block_tiles < num_tiles ? first + block_tiles : num_tiles;
        for (int64_t m = 0; m < m_size; m += 4) {
            for (int64_t t = first; t < end; t++) {
                const uint8_t *tile = w_packed + t * tile_bytes;
                const int64_t n = t * TILE_ROWS;
                if (m + 4 <= m_size)
                    for (int v = 0; v < TILE_VECS; v++)
                        int4_block(1, 4, x + m * ldx, ldx, sums + m * num_groups, tile, v, y + m * ldy + n, ldy,
                                   n_size - n, num_groups, group_size);
                else
                    for (int64_t r = m; r < m_size; r++)
                        int4_block(TILE_VECS, 1, x + r * ldx, ldx, sums + r * num_groups, tile, 0, y + r * ldy + n, ldy,
                                   n_size - n, num_groups, group_size);
            }
        }
    }
    free(sums);
    return 0;
}
#endif
