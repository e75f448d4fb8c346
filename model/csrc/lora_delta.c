/* LoRA deltas per row, for the serving engine's per-request adapters (server/engine/lora.py).
 *
 * After a base matmul y = x @ W.T over every row of a step, each adapter's rows get its delta on
 * the columns of each target the matmul computes (q, k and v share the fused qkv matmul, gate and
 * up the gate_up one):
 *
 *   t = x[row] @ A.T            (A [rank][in], fp32)
 *   y[row][first..] += t @ Bt   (Bt [rank][out] = scale * B.T, fp32)
 *
 * The decoder loop (decoder_layers.c) calls this after each of its four matmuls, so a step with
 * adapter rows keeps the one native call; the engine's per-layer modules call the exported
 * `hearth_lora_add` with the same tables, so both paths give the same bits.
 *
 * Design choices:
 * - An adapter is a table of num_layers * 7 terms (q, k, v, o, gate, up, down: trainer/lora.py's
 *   ALL_TARGETS order), built once when it is first used; a term with a NULL `a` is a target the
 *   adapter leaves alone. A step passes one group per adapter present: its table and its rows.
 * - Rows are independent: every t[j] is one dot product over `in` in a fixed order (8 fp32 lanes,
 *   then vf_sum), every output element one chain of fused multiply-adds over j in order, then one
 *   add into y (fp32; on the AVX-512 BF16 path rounded to bf16 once). So a row's result does not
 *   depend on which or how many rows share the step (batch invariance), nor on the thread count.
 * - Only exact work: no block-diagonal B over a fused matmul's targets, no padding rows.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

#if defined(__AVX512BF16__)
#include "bf16.h"
typedef uint16_t act_t; /* bf16 */
static inline float act_to_float(uint16_t value) { return bf16_to_float(value); }
static inline uint16_t act_add(uint16_t y, float delta) { return to_bf16(bf16_to_float(y) + delta); }
#else
typedef float act_t;
static inline float act_to_float(float value) { return value; }
static inline float act_add(float y, float delta) { return y + delta; }
#endif

#include "lora.h"

/* t[i][j] = x[rows[i]] . a[j], over j split between threads; in_features a multiple of 8. */
static void down_project(const hearth_lora_term *term, const float *xs, int64_t num_rows, float *t) {
    const int64_t in = term->in_features, rank = term->rank;
    #pragma omp for schedule(static)
    for (int64_t j = 0; j < rank; j++) {
        const float *a = term->a + j * in;
        for (int64_t i = 0; i < num_rows; i++) {
            const float *x = xs + i * in;
            vf sum = vf_zero();
            for (int64_t k = 0; k < in; k += 8) sum = vf_fma(vf_load(x + k), vf_load(a + k), sum);
            t[i * rank + j] = vf_sum(sum);
        }
    }
}

/* y[rows[i]][first + c] += t[i] . bt[:, c], over 8-column chunks split between threads. */
static void up_project(const hearth_lora_term *term, const float *t, const int64_t *rows, int64_t num_rows,
                       act_t *y, int64_t ldy, int64_t first) {
    const int64_t out = term->out_features, rank = term->rank;
    #pragma omp for schedule(static)
    for (int64_t c = 0; c < out; c += 8) {
        const int64_t width = out - c < 8 ? out - c : 8;
        for (int64_t i = 0; i < num_rows; i++) {
            vf sum = vf_zero();
            if (width == 8) {
                for (int64_t j = 0; j < rank; j++) sum = vf_fma(vf_set1(t[i * rank + j]), vf_load(term->bt + j * out + c), sum);
            } else {  /* a last partial chunk: the same chain per lane, from a zero-padded copy */
                float lanes[8];
                for (int64_t j = 0; j < rank; j++) {
                    memset(lanes, 0, sizeof lanes);
                    memcpy(lanes, term->bt + j * out + c, (size_t)width * sizeof(float));
                    sum = vf_fma(vf_set1(t[i * rank + j]), vf_load(lanes), sum);
                }
            }
            float delta[8];
            vf_store(delta, sum);
            act_t *row = y + rows[i] * ldy + first + c;
            for (int64_t l = 0; l < width; l++) row[l] = act_add(row[l], delta[l]);
        }
    }
}

/* xs[i] = x[rows[i]] as fp32. */
static void gather_rows(const act_t *x, int64_t ldx, int64_t in, const int64_t *rows, int64_t num_rows, float *xs) {
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < num_rows; i++)
        for (int64_t k = 0; k < in; k++) xs[i * in + k] = act_to_float(x[rows[i] * ldx + k]);
}

/* The largest group's rows and the largest rank of the terms `sites` use (the scratch's size); -2 if a
 * term's input width is not the matmul's. */
static int scratch_size(const hearth_lora_group *groups, int64_t num_groups, int64_t layer, int64_t in_features,
                        const hearth_lora_site *sites, int64_t num_sites, int64_t *max_rows, int64_t *max_rank) {
    *max_rows = 0, *max_rank = 0;
    for (int64_t g = 0; g < num_groups; g++) {
        if (groups[g].num_rows > *max_rows) *max_rows = groups[g].num_rows;
        for (int64_t s = 0; s < num_sites; s++) {
            const hearth_lora_term *term = &groups[g].table[layer * LORA_TARGETS + sites[s].target];
            if (!term->a) continue;
            if (term->in_features != in_features) return -2;
            if (term->rank > *max_rank) *max_rank = term->rank;
        }
    }
    return 0;
}

/* Add every group's deltas for the targets of one matmul (`sites`) of layer `layer` into y.
 * x: the matmul's input rows (in_features wide), y: its output. Returns 0, -1 (out of memory)
 * or -2 (in_features not a multiple of 8, or a term's shape not the matmul's). */
int hearth_lora_add(const act_t *x, int64_t ldx, int64_t in_features, act_t *y, int64_t ldy,
                    const hearth_lora_group *groups, int64_t num_groups, int64_t layer,
                    const hearth_lora_site *sites, int64_t num_sites, int num_threads) {
    int64_t max_rows, max_rank;
    if (in_features % 8 || scratch_size(groups, num_groups, layer, in_features, sites, num_sites, &max_rows, &max_rank))
        return -2;
    if (max_rank == 0) return 0;
    float *xs = malloc((size_t)(max_rows * in_features + max_rows * max_rank) * sizeof(float));
    if (!xs) return -1;
    float *t = xs + max_rows * in_features;
    const int64_t work = max_rows * max_rank * in_features * num_groups;
    #pragma omp parallel num_threads(num_threads) if (work > 32768)
    for (int64_t g = 0; g < num_groups; g++) {
        const hearth_lora_group *group = &groups[g];
        gather_rows(x, ldx, in_features, group->rows, group->num_rows, xs);
        for (int64_t s = 0; s < num_sites; s++) {
            const hearth_lora_term *term = &group->table[layer * LORA_TARGETS + sites[s].target];
            if (!term->a) continue;
            down_project(term, xs, group->num_rows, t);
            up_project(term, t, group->rows, group->num_rows, y, ldy, sites[s].first_column);
        }
    }
    free(xs);
    return 0;
}
