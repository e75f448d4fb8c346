/* Hearth's decoder layers in one native call: every layer of a step. One source for both paths:
 * `act_t` is the activation type, bf16 (uint16_t) on AVX-512 BF16 and fp32 on the fp32 path (vec.h:
 * AVX2 + FMA, ARM64 NEON); only the residual add and the SwiGLU have a version per path.
 *
 * Why it exists: with the matmuls, the attention, the rotary and the norms in native kernels,
 * what was left of a decode step outside them was Python: ~12 calls a layer through torch and
 * ctypes, each a few microseconds before it does any work, ~1.5 ms a step over 12 layers (a
 * quarter of an int8 decode step of the `small` model). This file runs the same layer loop in C
 * and calls the same kernels (linked into this library from their own files) in the same order:
 *
 *   h = rms_norm(x); qkv = h @ Wqkv; rope on q, k and the k/v cache write; a = attention(q);
 *   x = x + a @ Wo; h = rms_norm(x); g, u = h @ Wgate_up; x = x + (silu(g) * u) @ Wdown
 *
 * with, in a step that has LoRA adapter rows, each matmul's per-row adapter deltas added to its
 * output (lora_delta.c, the function the engine's per-layer modules call too).
 *
 * Arithmetic: each step of server/engine/cpu_fast.py's FusedBlock, with its roundings: the
 * residual adds round once to bf16 (as a bf16 `x + y` does), silu(g) rounds to bf16 before
 * the multiply by u, which rounds again (as `F.silu(gate) * up` in bf16 does). silu's exp is
 * exp_nonpositive (bf16.h), not PyTorch's, so a silu output can differ from PyTorch's by one
 * bf16 step where the fp32 value sits on a rounding boundary (over every finite bf16 gate, none
 * did: tests/test_native.py); everything else is the same kernels on the same inputs. Rows stay
 * independent (batch invariance holds as in the kernels). On the fp32 path the adds are fp32 adds
 * (as torch's) and the SwiGLU is `hearth_silu_mul`, which the engine's modules call too (so the
 * modules and this loop give the same bits; its exp differs from PyTorch's in the last bits).
 */
#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX512BF16__)
#include "bf16.h"

#include <immintrin.h>
typedef uint16_t act_t; /* bf16 */
#else
#include "vec.h"
typedef float act_t;
#endif
#include "lora.h"

/* The kernels of the other files, linked into this library. */
void hearth_linear_bf16(const act_t *x, int64_t ldx, const void *w_packed, act_t *y, int64_t ldy, int64_t m_size,
                        int64_t n_size, int64_t k_size, int num_threads);
int hearth_linear_int8(const act_t *x, int64_t ldx, const int8_t *w_packed, const float *scales, act_t *y,
                       int64_t ldy, int64_t m_size, int64_t n_size, int64_t k_size, int64_t group_size,
                       int num_threads);
int hearth_linear_int4(const act_t *x, int64_t ldx, const uint8_t *w_packed, act_t *y, int64_t ldy, int64_t m_size,
                       int64_t n_size, int64_t k_size, int64_t group_size, int num_threads);
int hearth_paged_attention(const act_t *q, int64_t q_row, int64_t q_head, const act_t *keys, const act_t *values,
                           int64_t kv_head_stride, const int32_t *block_ids, const int64_t *table_offsets,
                           const int32_t *positions, act_t *out, int64_t num_rows, int n_heads, int n_kv_heads,
                           int head_dim, int block_size, float scale, int num_threads);
void hearth_rope_write_kv(act_t *qkv, int64_t ld, const act_t *cos, const act_t *sin, int64_t num_rows, int n_heads,
                          int n_kv_heads, int head_dim, act_t *keys, act_t *values, int64_t kv_head_stride,
                          const int64_t *slots, int num_threads);
int hearth_rms_norm(const act_t *x, int64_t ldx, const act_t *weight, act_t *y, int64_t rows, int64_t dim, float eps,
                    int num_threads);

enum { HEARTH_BF16 = 0, HEARTH_INT8 = 1, HEARTH_INT4 = 2 };

/* One packed matmul (model/native.py's pack_bf16_weight, pack_int8_weight or pack_int4_weight). */
typedef struct {
    int64_t kind;         /* HEARTH_BF16, HEARTH_INT8 or HEARTH_INT4 */
    int64_t out_features; /* N */
    int64_t in_features;  /* K */
    const void *tiles;    /* the packed weight */
    const float *scales;  /* int8: the packed scales; otherwise unused */
    int64_t group_size;   /* int4, int8: input columns per scale (int8: 0 for one per output row) */
} hearth_linear;

typedef struct {
    const act_t *attn_norm, *mlp_norm; /* [dim] */
    hearth_linear qkv, o, gate_up, down;
    act_t *keys, *values; /* this layer's cache: [n_kv_heads][slots][head_dim] */
} hearth_layer;

/* What every layer shares in a step: the model's shape and the step's rows. */
typedef struct {
    int64_t dim, ffn_dim, kv_head_stride;
    int64_t n_heads, n_kv_heads, head_dim, block_size;
    float norm_eps, attention_scale;
    const act_t *cos, *sin;       /* [rows][head_dim] */
    const int64_t *slots;         /* [rows]: where each row's k and v go */
    const int32_t *block_ids;     /* every row's block table, end to end */
    const int64_t *table_offsets; /* [rows]: where a row's table starts in block_ids */
    const int32_t *positions;     /* [rows]: a row sees keys 0..positions[r] */
    const hearth_lora_group *lora_groups; /* the step's LoRA adapters and their rows (lora_delta.c) */
    int64_t num_lora_groups;              /* 0: base rows only */
} hearth_step;

/* y = x @ W.T (M rows, y contiguous). Returns the kernel's status. */
static int linear(const hearth_linear *w, const act_t *x, int64_t ldx, act_t *y, int64_t rows, int threads) {
    if (w->kind == HEARTH_INT8)
        return hearth_linear_int8(x, ldx, (const int8_t *)w->tiles, w->scales, y, w->out_features, rows,
                                  w->out_features, w->in_features, w->group_size, threads);
    if (w->kind == HEARTH_INT4)
        return hearth_linear_int4(x, ldx, (const uint8_t *)w->tiles, y, w->out_features, rows, w->out_features,
                                  w->in_features, w->group_size, threads);
    hearth_linear_bf16(x, ldx, w->tiles, y, w->out_features, rows, w->out_features, w->in_features, threads);
    return 0;
}

/* The targets of each of a layer's four matmuls, with their first output column. */
typedef struct {
    hearth_lora_site qkv[3], o[1], gate_up[2], down[1];
} lora_sites;

static lora_sites sites_of(const hearth_step *step) {
    const int64_t q = step->n_heads * step->head_dim, kv = step->n_kv_heads * step->head_dim;
    lora_sites sites = {{{0, 0}, {1, q}, {2, q + kv}}, {{3, 0}}, {{4, 0}, {5, step->ffn_dim}}, {{6, 0}}};
    return sites;
}

/* y += the step's LoRA deltas of one matmul (a no-op for a step of base rows). */
static int lora(const hearth_step *step, int64_t layer, const hearth_lora_site *sites, int64_t num_sites,
                const act_t *x, int64_t in_features, act_t *y, int64_t out_features, int threads) {
    if (!step->num_lora_groups) return 0;
    return hearth_lora_add(x, in_features, in_features, y, out_features, step->lora_groups, step->num_lora_groups,
                           layer, sites, num_sites, threads);
}

#if defined(__AVX512BF16__)
/* x += y, rounded to bf16 once per element; count a multiple of 16. */
static void add_into(uint16_t *x, const uint16_t *y, int64_t count, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (count > 65536)
    for (int64_t i = 0; i < count; i += 16)
        _mm256_storeu_si256((__m256i *)(x + i), to_bf16x16(_mm512_add_ps(load_bf16x16(x + i), load_bf16x16(y + i))));
}

/* out[r] = bf16(bf16(silu(gate)) * up) with gate, up the halves of gate_up[r]; ffn_dim a multiple of 16.
 * Exported for the tests (every finite bf16 gate against PyTorch's silu). */
void hearth_silu_mul(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t ffn_dim, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows > 16)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *gate = gate_up + r * 2 * ffn_dim, *up = gate + ffn_dim;
        for (int64_t d = 0; d < ffn_dim; d += 16) {
            const __m512 g = load_bf16x16(gate + d), one = _mm512_set1_ps(1.0f);
            /* sigmoid from exp(-|g|) <= 1: 1 / (1 + e) for g >= 0, e / (1 + e) below */
            const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
            const __mmask16 negative = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
            const __m512 sigmoid = _mm512_div_ps(_mm512_mask_mov_ps(one, negative, e), _mm512_add_ps(one, e));
            /* below -88.72, PyTorch's g / (1 + exp(-g)) overflows exp to inf: exactly -0 */
            const __mmask16 overflow = _mm512_cmp_ps_mask(g, _mm512_set1_ps(-88.7228394f), _CMP_LT_OQ);
            const __m512 product = _mm512_mask_mov_ps(_mm512_mul_ps(g, sigmoid), overflow, _mm512_set1_ps(-0.0f));
            uint16_t silu[16];
            _mm256_storeu_si256((__m256i *)silu, to_bf16x16(product));
            _mm256_storeu_si256((__m256i *)(out + r * ffn_dim + d),
                                to_bf16x16(_mm512_mul_ps(load_bf16x16(silu), load_bf16x16(up + d))));
        }
    }
}

#else
/* x += y in fp32, as torch's add; count a multiple of 8. */
static void add_into(float *x, const float *y, int64_t count, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (count > 65536)
    for (int64_t i = 0; i < count; i += 8) vf_store(x + i, vf_add(vf_load(x + i), vf_load(y + i)));
}

/* out[r] = silu(gate) * up in fp32, gate and up the halves of gate_up[r]; silu(g) = g * sigmoid(g),
 * the sigmoid from exp(-|g|) as the AVX-512 path. ffn_dim a multiple of 8. Exported: the engine's
 * modules call it too, so they and the decoder loop agree bit for bit. */
void hearth_silu_mul(const float *gate_up, float *out, int64_t rows, int64_t ffn_dim, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows > 16)
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = gate_up + r * 2 * ffn_dim, *up = gate + ffn_dim;
        for (int64_t d = 0; d < ffn_dim; d += 8) {
            const vf g = vf_load(gate + d), one = vf_set1(1.0f);
            const vf e = vf_exp_nonpositive(vf_sub(vf_zero(), vf_abs(g)));
            const vf sigmoid = vf_div(vf_select_lt(g, vf_zero(), e, one), vf_add(one, e));
            vf_store(out + r * ffn_dim + d, vf_mul(vf_mul(g, sigmoid), vf_load(up + d)));
        }
    }
}
#endif

/* The scratch a step needs, in one allocation: normed x, qkv, attention out, a matmul out, gate_up, act. */
typedef struct {
    act_t *normed, *qkv, *attended, *projected, *gate_up, *act;
    void *memory;
} scratch;

static int scratch_alloc(scratch *s, const hearth_step *step, int64_t rows) {
    const int64_t qkv_width = (step->n_heads + 2 * step->n_kv_heads) * step->head_dim;
    const int64_t widths[6] = {step->dim, qkv_width, step->n_heads * step->head_dim, step->dim,
                               2 * step->ffn_dim, step->ffn_dim};
    int64_t offsets[6], total = 0;
    for (int i = 0; i < 6; i++) {
        offsets[i] = total;
        total += (rows * widths[i] * (int64_t)sizeof(act_t) + 63) / 64 * 64;
    }
    s->memory = aligned_alloc(64, (size_t)total);
    if (!s->memory) return -1;
    act_t **slots[6] = {&s->normed, &s->qkv, &s->attended, &s->projected, &s->gate_up, &s->act};
    for (int i = 0; i < 6; i++) *slots[i] = (act_t *)((char *)s->memory + offsets[i]);
    return 0;
}

static int run_layer(const hearth_layer *layer, int64_t index, const hearth_step *step, act_t *x, int64_t rows,
                     scratch *s, int threads) {
    const int64_t dim = step->dim, qkv_width = layer->qkv.out_features, ffn = step->ffn_dim;
    const lora_sites sites = sites_of(step);
    int status = hearth_rms_norm(x, dim, layer->attn_norm, s->normed, rows, dim, step->norm_eps, threads);
    if (!status) status = linear(&layer->qkv, s->normed, dim, s->qkv, rows, threads);
    if (!status) status = lora(step, index, sites.qkv, 3, s->normed, dim, s->qkv, qkv_width, threads);
    if (status) return status;
    hearth_rope_write_kv(s->qkv, qkv_width, step->cos, step->sin, rows, (int)step->n_heads, (int)step->n_kv_heads,
                         (int)step->head_dim, layer->keys, layer->values, step->kv_head_stride, step->slots, threads);
    status = hearth_paged_attention(s->qkv, qkv_width, step->head_dim, layer->keys, layer->values,
                                    step->kv_head_stride, step->block_ids, step->table_offsets, step->positions,
                                    s->attended, rows, (int)step->n_heads, (int)step->n_kv_heads,
                                    (int)step->head_dim, (int)step->block_size, step->attention_scale, threads);
    const int64_t attended_width = layer->o.in_features;
    if (!status) status = linear(&layer->o, s->attended, attended_width, s->projected, rows, threads);
    if (!status) status = lora(step, index, sites.o, 1, s->attended, attended_width, s->projected, dim, threads);
    if (status) return status;
    add_into(x, s->projected, rows * dim, threads);
    status = hearth_rms_norm(x, dim, layer->mlp_norm, s->normed, rows, dim, step->norm_eps, threads);
    if (!status) status = linear(&layer->gate_up, s->normed, dim, s->gate_up, rows, threads);
    if (!status) status = lora(step, index, sites.gate_up, 2, s->normed, dim, s->gate_up, 2 * ffn, threads);
    if (status) return status;
    hearth_silu_mul(s->gate_up, s->act, rows, ffn, threads);
    status = linear(&layer->down, s->act, ffn, s->projected, rows, threads);
    if (!status) status = lora(step, index, sites.down, 1, s->act, ffn, s->projected, dim, threads);
    if (!status) add_into(x, s->projected, rows * dim, threads);
    return status;
}

/* x: [rows][dim] act_t, contiguous, updated in place through every layer. Returns 0, -1 (out of
 * memory) or -2 (a shape a kernel cannot take: dim or ffn_dim not a multiple of 16, head_dim). */
int hearth_decoder_layers(act_t *x, int64_t rows, const hearth_layer *layers, int64_t num_layers,
                          const hearth_step *step, int num_threads) {
    if (step->dim % 16 || step->ffn_dim % 16) return -2;
    scratch s;
    if (scratch_alloc(&s, step, rows)) return -1;
    int status = 0;
    for (int64_t i = 0; i < num_layers && !status; i++) status = run_layer(&layers[i], i, step, x, rows, &s, num_threads);
    free(s.memory);
    return status;
}
