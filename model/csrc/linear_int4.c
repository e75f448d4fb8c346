/* Hearth's int4 linear for x86-64 CPUs with AVX-512 BF16: Y[M, N] = X[M, K] @ W[N, K]^T, where
 * W = (q - 8) * scale + zero per group of `group_size` input columns (model/quant_kernels.py's
 * int4 format: codes q in 0..15, bf16 scales and zeros per output row and group). X, Y: bf16.
 *
 * Why it exists: an int4 decode step reads 0.625 bytes a weight, a quarter of bf16's, but
 * PyTorch's `_weight_int4pack_mm_for_cpu` streams them at ~8 GB/s here (bench_decode_step.py),
 * so int4 decoded no faster than int8. This kernel needs no dequantized weight and no lane sums:
 *
 * - Lanes are output rows. W is packed once into tiles of 16 output rows; in a tile, group by
 *   group, 32 bytes hold 4 input columns of the 16 rows (byte 2l + h: row l, column 2c + h in its
 *   low nibble and column 2c + 2 + h in its high one), the group's 16 scales and 16 zeros (bf16)
 *   after its codes. A tile is one sequential stream.
 * - A nibble becomes the bf16 of 128 + q by an OR with 0x4300 (128.0), exact; `vdpbf16ps` then
 *   takes a pair of columns of 16 rows against a broadcast pair of x. Per group and lane,
 *   dot = sum x (128 + q), so sum x w = scale * dot + (zero - 136 * scale) * sum x over the group,
 *   with sum x computed once per row and group.
 *
 * Arithmetic, for every output Y[m, n]: per group, two fp32 partial dots (even and odd column
 * pairs, each `vdpbf16ps` in column order), added; y = fma(scale, dot, y), then
 * y = fma(zero - 136 scale, sum x, y), groups in order; rounded to bf16 (nearest even). The same
 * for a 4-tile block of one row and a tile of 4 rows, so a row's result does not depend on the row
 * count (batch invariance). The 128 q offset costs ~1e-6 relative (fp32), far under bf16's 4e-3.
 * group_size must be a multiple of 32 and divide K; N is padded to 16 in the tiles.
 */
#include "bf16.h"

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE_N 16
#define BLOCK_TILES 8 /* 128 rows: 61 KB at K = 768 with group 32 */

static inline int64_t group_bytes(int64_t group_size) { return group_size * TILE_N / 2 + 2 * TILE_N * 2; }

static inline __m512bh broadcast_pair(const uint16_t *x) {
    int32_t pair;
    memcpy(&pair, x, sizeof pair);
    return (__m512bh)_mm512_set1_epi32(pair);
}

/* `nt` tiles (consecutive, tile_bytes apart) against `nr` rows of X: nt * nr outputs of 16 lanes.
 * Called with constants, so the loops unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void int4_block(
    const int nt, const int nr, const uint16_t *x, int64_t ldx, const float *sums, int64_t num_groups,
    int64_t group_size, const uint8_t *tile, int64_t tile_bytes, uint16_t *y, int64_t ldy, int64_t num_out) {
    const int64_t chunks = group_size / 4, stride = group_bytes(group_size);
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
                const uint8_t *w = tile + t * tile_bytes + g * stride + 32 * c;
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
            const uint16_t *scale_zero = (const uint16_t *)(tile + t * tile_bytes + g * stride + 32 * chunks);
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

/* One block of tiles against every row: 4-tile blocks for a single row (4 weight streams in
 * flight), tiles of 4 rows otherwise; what is left goes one tile, one row at a time. */
static void run_block(const uint16_t *x, int64_t ldx, const float *sums, int64_t m_size, int64_t num_groups,
                      int64_t group_size, const uint8_t *w_packed, int64_t first_tile, int64_t end_tile,
                      uint16_t *y, int64_t ldy, int64_t n_size) {
    const int64_t tile_bytes = num_groups * group_bytes(group_size);
    for (int64_t m = 0; m < m_size; m += 4) {
        const int64_t rows = m_size - m < 4 ? m_size - m : 4;
        const uint16_t *xm = x + m * ldx;
        const float *sm = sums + m * num_groups;
        int64_t t = first_tile;
        if (rows == 1)
            for (; t + 4 <= end_tile; t += 4)
                int4_block(4, 1, xm, ldx, sm, num_groups, group_size, w_packed + t * tile_bytes, tile_bytes,
                           y + m * ldy + t * TILE_N, ldy, n_size - t * TILE_N);
        for (; t < end_tile; t++) {
            const uint8_t *tile = w_packed + t * tile_bytes;
            uint16_t *yt = y + m * ldy + t * TILE_N;
            if (rows == 4) {
                int4_block(1, 4, xm, ldx, sm, num_groups, group_size, tile, tile_bytes, yt, ldy, n_size - t * TILE_N);
            } else {
                for (int64_t r = 0; r < rows; r++)
                    int4_block(1, 1, xm + r * ldx, ldx, sm + r * num_groups, num_groups, group_size, tile,
                               tile_bytes, yt + r * ldy, ldy, n_size - t * TILE_N);
            }
        }
    }
}

/* Returns 0, -1 when out of memory, -2 when group_size is not a multiple of 32 dividing K. */
int hearth_linear_int4(const uint16_t *x, int64_t ldx, const uint8_t *w_packed, uint16_t *y, int64_t ldy,
                       int64_t m_size, int64_t n_size, int64_t k_size, int64_t group_size, int num_threads) {
    if (group_size <= 0 || group_size % 32 || k_size % group_size) return -2;
    const int64_t num_groups = k_size / group_size;
    const int64_t num_tiles = (n_size + TILE_N - 1) / TILE_N;
    const int64_t num_blocks = (num_tiles + BLOCK_TILES - 1) / BLOCK_TILES;
    float *sums = malloc((size_t)(m_size * num_groups) * sizeof(float));
    if (!sums) return -1;
    group_sums(x, ldx, m_size, num_groups, group_size, sums);
    #pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t block = 0; block < num_blocks; block++) {
        const int64_t first_tile = block * BLOCK_TILES;
        const int64_t end_tile = first_tile + BLOCK_TILES < num_tiles ? first_tile + BLOCK_TILES : num_tiles;
        run_block(x, ldx, sums, m_size, num_groups, group_size, w_packed, first_tile, end_tile, y, ldy, n_size);
    }
    free(sums);
    return 0;
}
