/* Hearth's bf16-weight linear: Y[M, N] = X[M, K] @ W[N, K]^T. Two paths, one per kind of CPU:
 * - AVX-512 BF16 (the first part below): X and Y bf16, `vdpbf16ps`;
 * - the fp32 path (vec.h: AVX2 + FMA, ARM64 NEON; the second part): X and Y fp32, the bf16
 *   weights widened to fp32 in registers (exact), fused multiply-adds.
 *
 * The AVX-512 BF16 path:
 * Why it exists: a decode step is a chain of GEMVs, bound by how fast the weights
 * stream from memory. oneDNN's bf16 GEMV reads ~20 GB/s on the 2-core EPYC this was
 * written on; this kernel walks each thread's weights as one sequential stream and
 * reads ~30 GB/s, about what a plain sum over memory gets. For many rows (prefill)
 * its 4 x 4 register tiles run at ~0.85x oneDNN's GEMM (bench/bench_decode_step.py).
 *
 * Layout: W is packed once (in Python) into tiles of 4 output rows,
 * [ceil(N/4)][Kp/32][4][32] with Kp = K rounded up to 32 and zero padding, so a
 * tile's four rows are read front to back as one stream.
 *
 * Arithmetic: every output element Y[m, n] is one fp32 accumulator fed by
 * _mm512_dpbf16_ps over K in 32-wide chunks, in order, then a fixed-order lane sum
 * and round-to-nearest-even to bf16. No other row of X or W takes part, and the
 * tiling over M only changes which accumulators share a loop, so a row's result
 * is the same whatever else is in the batch (batch invariance by construction).
 */
#if defined(__AVX512BF16__)
#include "bf16.h"

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define TILE_N 4
#define CHUNK_K 32
#define BLOCK_TILES 16 /* 64 weight rows: 96 KB at K = 768 */

#define LOAD_W(w)                                                                      \
    __m512bh w0 = (__m512bh)_mm512_loadu_si512(w), w1 = (__m512bh)_mm512_loadu_si512(w + 32), \
             w2 = (__m512bh)_mm512_loadu_si512(w + 64), w3 = (__m512bh)_mm512_loadu_si512(w + 96)
#define DOT_ROW(a, xv)                                                                 \
    a##0 = _mm512_dpbf16_ps(a##0, w0, xv); a##1 = _mm512_dpbf16_ps(a##1, w1, xv);      \
    a##2 = _mm512_dpbf16_ps(a##2, w2, xv); a##3 = _mm512_dpbf16_ps(a##3, w3, xv)
#define STORE_ROW(a, out)                                                              \
    do { uint16_t *o = (out); o[0] = to_bf16(_mm512_reduce_add_ps(a##0));             \
         if (num_out > 1) o[1] = to_bf16(_mm512_reduce_add_ps(a##1));                 \
         if (num_out > 2) o[2] = to_bf16(_mm512_reduce_add_ps(a##2));                 \
         if (num_out > 3) o[3] = to_bf16(_mm512_reduce_add_ps(a##3)); } while (0)

static inline __mmask32 tail_mask(int64_t k, int64_t k_size) {
    return k + CHUNK_K <= k_size ? 0xffffffffu : (__mmask32)((1ull << (k_size - k)) - 1);
}

/* One tile of 4 weight rows against 4 rows of X: 16 accumulators in registers. With `ahead`,
 * each chunk also prefetches `ahead_lines` cache lines (of its 4) at the same place in the next
 * block of tiles (see hearth_linear_bf16). */
static void tile_4rows(const uint16_t *x, int64_t ldx, const uint16_t *w, uint16_t *y, int64_t ldy,
                       int64_t num_out, int64_t k_size, const uint16_t *ahead, int ahead_lines) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    __m512 c0 = a0, c1 = a0, c2 = a0, c3 = a0, d0 = a0, d1 = a0, d2 = a0, d3 = a0;
    for (int64_t k = 0; k < k_size; k += CHUNK_K, w += TILE_N * CHUNK_K, ahead += TILE_N * CHUNK_K) {
        const __mmask32 mask = tail_mask(k, k_size);
        for (int line = 0; line < ahead_lines; line++) _mm_prefetch((const char *)(ahead + 32 * line), _MM_HINT_T1);
        LOAD_W(w);
        __m512bh xa = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + k);
        __m512bh xb = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + ldx + k);
        __m512bh xc = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + 2 * ldx + k);
        __m512bh xd = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + 3 * ldx + k);
        DOT_ROW(a, xa); DOT_ROW(b, xb); DOT_ROW(c, xc); DOT_ROW(d, xd);
    }
    STORE_ROW(a, y); STORE_ROW(b, y + ldy); STORE_ROW(c, y + 2 * ldy); STORE_ROW(d, y + 3 * ldy);
}

/* The same for one row of X: each accumulator sees the same operations in the same order. */
static void tile_1row(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t num_out, int64_t k_size) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < k_size; k += CHUNK_K, w += TILE_N * CHUNK_K) {
        LOAD_W(w);
        __m512bh xa = (__m512bh)_mm512_maskz_loadu_epi16(tail_mask(k, k_size), x + k);
        DOT_ROW(a, xa);
    }
    STORE_ROW(a, y);
}

/* How many of a chunk's 4 cache lines in the next block the 4-row slice `slice` prefetches: the
 * second and third slices take half each. With only two full slices, none (all 4 lines in the
 * second slice ran 0.82-0.89x at 8 rows: bench/ab_kernels.py). */
static inline int ahead_lines(int64_t slice, int64_t full_slices) {
    return full_slices >= 3 && (slice == 1 || slice == 2) ? 2 : 0;
}

void hearth_linear_bf16(const uint16_t *x, int64_t ldx, const uint16_t *w_packed, uint16_t *y, int64_t ldy,
                        int64_t m_size, int64_t n_size, int64_t k_size, int num_threads) {
    const int64_t num_tiles = (n_size + TILE_N - 1) / TILE_N;
    const int64_t num_blocks = (num_tiles + BLOCK_TILES - 1) / BLOCK_TILES;
    const int64_t k_padded = (k_size + CHUNK_K - 1) / CHUNK_K * CHUNK_K;
    /* A block of tiles (its weights stay in L2) meets every 4-row slice of X (in L1) before the next block.
     * The first slice waits on memory, the others compute from L2 with memory idle: so the second and
     * third slices prefetch the next block into L2 (ahead_lines), 1.16x at 16 rows on cold weights
     * (bench/ab_kernels.py). Prefetching changes no arithmetic. */
    #pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t block = 0; block < num_blocks; block++) {
        const int64_t first_tile = block * BLOCK_TILES;
        const int64_t end_tile = first_tile + BLOCK_TILES < num_tiles ? first_tile + BLOCK_TILES : num_tiles;
        for (int64_t m = 0; m < m_size; m += 4) {
            const uint16_t *x_rows = x + m * ldx;
            for (int64_t t = first_tile; t < end_tile; t++) {
                const uint16_t *w_tile = w_packed + t * TILE_N * k_padded;
                const int64_t n = t * TILE_N;
                uint16_t *y_tile = y + m * ldy + n;
                if (m + 4 <= m_size) {
                    const int64_t slice = m / 4;
                    const int lines = t + BLOCK_TILES < num_tiles ? ahead_lines(slice, m_size / 4) : 0;
                    /* the same place in the next block; the third slice starts at the chunk's third line */
                    const uint16_t *ahead = lines ? w_tile + BLOCK_TILES * TILE_N * k_padded + (slice == 2 ? 64 : 0) : w_tile;
                    tile_4rows(x_rows, ldx, w_tile, y_tile, ldy, n_size - n, k_size, ahead, lines);
                } else {
                    for (int64_t row = 0; m + row < m_size; row++)
                        tile_1row(x_rows + row * ldx, w_tile, y_tile + row * ldy, n_size - n, k_size);
                }
            }
        }
    }
}

#else /* the fp32 path: X and Y fp32 */
#include "vec.h"

/* Layout: tiles of 32 output rows (4 vectors of 8 lanes, a lane an output row), each tile
 * [ceil(K/2)][32] 32-bit words, word l of pair p holding W[l, 2p] in its low half and W[l, 2p + 1]
 * in its high half (zero padding past K and N): a tile is one sequential stream, read once per
 * 1-4 rows of X. No lane sums: a lane is an output.
 *
 * Arithmetic: Y[m, n] = even + odd, two fp32 accumulators fed by fused multiply-adds in column
 * order (even columns into one, odd into the other, two dependency chains), then rounded nowhere
 * else. Every row of X goes through the same sequence whatever the row count (1-row and 4-row
 * blocks run the same per-output steps), so a row's result is batch invariant. */
#define TILE_ROWS 32
#define TILE_VECS 4

/* Vectors v0..v0 + nv - 1 of one tile against nr rows of X. Called with constants: the loops
 * unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void bf16_block(
    const int nv, const int nr, const float *x, int64_t ldx, const uint32_t *w, const int v0, float *y,
    int64_t ldy, int64_t num_out, int64_t k_size) {
    vf even[TILE_VECS][4], odd[TILE_VECS][4];
    for (int v = 0; v < nv; v++)
        for (int r = 0; r < nr; r++) even[v][r] = odd[v][r] = vf_zero();
    const int64_t pairs = k_size / 2;
    for (int64_t p = 0; p < pairs; p++, w += TILE_ROWS) {
        for (int v = 0; v < nv; v++) {
            const vi words = vi_load(w + 8 * (v0 + v));
            const vf low = vi_bf16_low(words), high = vi_bf16_high(words);
            for (int r = 0; r < nr; r++) {
                even[v][r] = vf_fma(low, vf_set1(x[r * ldx + 2 * p]), even[v][r]);
                odd[v][r] = vf_fma(high, vf_set1(x[r * ldx + 2 * p + 1]), odd[v][r]);
            }
        }
    }
    if (k_size % 2) /* the last column; its word's high half is padding */
        for (int v = 0; v < nv; v++) {
            const vf low = vi_bf16_low(vi_load(w + 8 * (v0 + v)));
            for (int r = 0; r < nr; r++) even[v][r] = vf_fma(low, vf_set1(x[r * ldx + k_size - 1]), even[v][r]);
        }
    for (int v = 0; v < nv; v++)
        for (int r = 0; r < nr; r++)
            store_outputs(y + r * ldy + 8 * (v0 + v), vf_add(even[v][r], odd[v][r]), num_out - 8 * (v0 + v));
}

void hearth_linear_bf16(const float *x, int64_t ldx, const uint32_t *w_packed, float *y, int64_t ldy,
                        int64_t m_size, int64_t n_size, int64_t k_size, int num_threads) {
    const int64_t num_tiles = (n_size + TILE_ROWS - 1) / TILE_ROWS;
    const int64_t tile_words = (k_size + 1) / 2 * TILE_ROWS;
    const int64_t block_tiles = tiles_per_block(m_size, tile_words * 4);
    const int64_t num_blocks = (num_tiles + block_tiles - 1) / block_tiles;
    #pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t block = 0; block < num_blocks; block++) {
        const int64_t first = block * block_tiles, end = first + block_tiles < num_tiles ? first + block_tiles : num_tiles;
        for (int64_t m = 0; m < m_size; m += 4) {
            const float *xm = x + m * ldx;
            for (int64_t t = first; t < end; t++) {
                const uint32_t *w = w_packed + t * tile_words;
                const int64_t n = t * TILE_ROWS;
                if (m + 4 <= m_size)
                    for (int v = 0; v < TILE_VECS; v++) bf16_block(1, 4, xm, ldx, w, v, y + m * ldy + n, ldy, n_size - n, k_size);
                else
                    for (int64_t r = 0; m + r < m_size; r++)
                        bf16_block(TILE_VECS, 1, xm + r * ldx, ldx, w, 0, y + (m + r) * ldy + n, ldy, n_size - n, k_size);
            }
        }
    }
}
#endif
