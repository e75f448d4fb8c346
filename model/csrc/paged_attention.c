/* Hearth's attention over a paged KV cache, and the rotary embedding with the cache write. Two
 * paths, one per kind of CPU: AVX-512 BF16 (the first part below: q, the cache and the output in
 * bf16) and the fp32 path (vec.h: AVX2 + FMA, ARM64 NEON; the second part: all fp32). Both read
 * the blocks in place and compute each row on its own, in the same order.
 *
 * The AVX-512 BF16 path:
 *
 * Each query row r attends, per query head h, to the keys at positions 0..positions[r]
 * of its own sequence, found through that sequence's block table. Rows are independent:
 * a decode row, a row of a prefill chunk and a row of a batch of 64 run the same code.
 *
 * Why it exists: the PyTorch path gathers each step's blocks into a dense copy, builds
 * masks, and makes ~12 small calls per layer (two matmuls, a softmax, casts, index ops);
 * for a few decode rows that is most of the attention time. Here one call per layer reads
 * the blocks in place.
 *
 * Arithmetic: q and k widened to fp32, q . k as 16-wide FMAs over head_dim then a fixed-
 * order lane sum, times the scale; softmax in fp32 (max, exp by a fixed polynomial, sum in
 * key order); the output is sum_j p_j v_j in key order, divided by the sum, rounded to bf16
 * (nearest even). It depends on nothing but the row's query, its keys and values, so a
 * row's result is the same in any batch, in a prefill or a decode step (batch invariance
 * and prefill/decode agreement by construction). head_dim must be a multiple of 16.
 */
#if defined(__AVX512BF16__)
#include "bf16.h"

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t act_t; /* bf16 */
#define HEAD_DIM_MULTIPLE 16
#define MAX_HEAD_DIM 256

static inline float round_bf16(float value) { return bf16_to_float(to_bf16(value)); }

/* One (row, head): scores into `scores` (num_keys floats), then the output row. */
static void attend_one(const uint16_t *q, const uint16_t *keys, const uint16_t *values, const int32_t *block_ids,
                       int64_t num_keys, int head_dim, int block_size, float scale, float *scores, uint16_t *out) {
    const int chunks = head_dim / 16;
    __m512 qv[MAX_HEAD_DIM / 16];
    for (int c = 0; c < chunks; c++) qv[c] = load_bf16x16(q + 16 * c);
    float max_score = -INFINITY;
    for (int64_t j = 0; j < num_keys; j++) {
        const int64_t slot = (int64_t)block_ids[j / block_size] * block_size + j % block_size;
        const uint16_t *k = keys + slot * head_dim;
        __m512 dot = _mm512_mul_ps(qv[0], load_bf16x16(k));
        for (int c = 1; c < chunks; c++) dot = _mm512_fmadd_ps(qv[c], load_bf16x16(k + 16 * c), dot);
        scores[j] = _mm512_reduce_add_ps(dot) * scale;
        max_score = scores[j] > max_score ? scores[j] : max_score;
    }
    /* exp in 16-key vectors (the tail masked); the sum in a fixed lane order */
    __m512 sums = _mm512_setzero_ps();
    const __m512 max_v = _mm512_set1_ps(max_score);
    for (int64_t j = 0; j < num_keys; j += 16) {
        const __mmask16 mask = j + 16 <= num_keys ? 0xffff : (__mmask16)((1u << (num_keys - j)) - 1);
        __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, scores + j), max_v));
        e = _mm512_maskz_mov_ps(mask, e);
        _mm512_mask_storeu_ps(scores + j, mask, e);
        sums = _mm512_add_ps(sums, e);
    }
    const float inverse_sum = 1.0f / _mm512_reduce_add_ps(sums);
    __m512 acc[MAX_HEAD_DIM / 16];
    for (int c = 0; c < chunks; c++) acc[c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < num_keys; j++) {
        const int64_t slot = (int64_t)block_ids[j / block_size] * block_size + j % block_size;
        const uint16_t *v = values + slot * head_dim;
        const __m512 p = _mm512_set1_ps(scores[j]);
        for (int c = 0; c < chunks; c++) acc[c] = _mm512_fmadd_ps(p, load_bf16x16(v + 16 * c), acc[c]);
    }
    for (int c = 0; c < chunks; c++) {
        float lanes[16];
        _mm512_storeu_ps(lanes, _mm512_mul_ps(acc[c], _mm512_set1_ps(inverse_sum)));
        for (int d = 0; d < 16; d++) out[16 * c + d] = to_bf16(lanes[d]);
    }
}

/* Rotary embedding on the q and k heads of a qkv projection, in place, then k and v into the cache.
 *
 * qkv: [rows][(n_heads + 2 n_kv_heads) * head_dim] bf16, row stride ld (q heads, k heads, v heads);
 * cos, sin: [rows][head_dim] bf16 (model.decoder.Transformer.rope: the halves repeated);
 * keys, values: this layer's [n_kv_heads][slots][head_dim]; slots[r]: where row r's k and v go.
 * x' = x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1), rounded to bf16 after each
 * multiply and after the sum, as the bf16 ops of model.decoder.apply_rope do: the same bits. */
void hearth_rope_write_kv(uint16_t *qkv, int64_t ld, const uint16_t *cos, const uint16_t *sin, int64_t num_rows,
                          int n_heads, int n_kv_heads, int head_dim, uint16_t *keys, uint16_t *values,
                          int64_t kv_head_stride, const int64_t *slots, int num_threads) {
    const int half = head_dim / 2;
    #pragma omp parallel for num_threads(num_threads) schedule(static) if (num_rows > 16)
    for (int64_t r = 0; r < num_rows; r++) {
        uint16_t *row = qkv + r * ld;
        const uint16_t *c = cos + r * head_dim, *s = sin + r * head_dim;
        for (int h = 0; h < n_heads + n_kv_heads; h++) {
            uint16_t *x = row + h * head_dim;
            for (int d = 0; d < half; d++) {
                const float x1 = bf16_to_float(x[d]), x2 = bf16_to_float(x[d + half]);
                const float first = round_bf16(round_bf16(x1 * bf16_to_float(c[d])) +
                                               round_bf16(-x2 * bf16_to_float(s[d])));
                const float second = round_bf16(round_bf16(x2 * bf16_to_float(c[d + half])) +
                                                round_bf16(x1 * bf16_to_float(s[d + half])));
                x[d] = to_bf16(first);
                x[d + half] = to_bf16(second);
            }
        }
        for (int h = 0; h < n_kv_heads; h++) {
            memcpy(keys + h * kv_head_stride + slots[r] * head_dim, row + (n_heads + h) * head_dim, head_dim * 2);
            memcpy(values + h * kv_head_stride + slots[r] * head_dim, row + (n_heads + n_kv_heads + h) * head_dim,
                   head_dim * 2);
        }
    }
}

#else /* the fp32 path: q, the cache and the output fp32 */
#include "vec.h"

#include <math.h>
#include <stdlib.h>

typedef float act_t;
#define HEAD_DIM_MULTIPLE 8
#define MAX_HEAD_DIM 256

/* One (row, head), as the AVX-512 path: q . k in 8-lane fused multiply-adds over head_dim then
 * vf_sum, times the scale; softmax in fp32 (the max, vf_exp_nonpositive 8 keys at a time, the sum
 * of the 8-lane vectors in key order, then vf_sum); out = sum_j p_j v_j in key order, times 1 / sum. */
static void attend_one(const float *q, const float *keys, const float *values, const int32_t *block_ids,
                       int64_t num_keys, int head_dim, int block_size, float scale, float *scores, float *out) {
    const int chunks = head_dim / 8;
    vf qv[MAX_HEAD_DIM / 8];
    for (int c = 0; c < chunks; c++) qv[c] = vf_load(q + 8 * c);
    float max_score = -INFINITY;
    for (int64_t j = 0; j < num_keys; j++) {
        const float *k = keys + ((int64_t)block_ids[j / block_size] * block_size + j % block_size) * head_dim;
        vf dot = vf_mul(qv[0], vf_load(k));
        for (int c = 1; c < chunks; c++) dot = vf_fma(qv[c], vf_load(k + 8 * c), dot);
        scores[j] = vf_sum(dot) * scale;
        max_score = scores[j] > max_score ? scores[j] : max_score;
    }
    vf sums = vf_zero();
    const vf max_v = vf_set1(max_score);
    for (int64_t j = 0; j < num_keys; j += 8) {
        const vf e = vf_exp_nonpositive(vf_sub(vf_load(scores + j), max_v)); /* scores has 8 floats of slack */
        vf_store(scores + j, e);
        for (int64_t pad = num_keys; pad < j + 8; pad++) scores[pad] = 0.0f; /* past the last key: weight 0 */
        sums = vf_add(sums, vf_load(scores + j));
    }
    const float inverse_sum = 1.0f / vf_sum(sums);
    vf acc[MAX_HEAD_DIM / 8];
    for (int c = 0; c < chunks; c++) acc[c] = vf_zero();
    for (int64_t j = 0; j < num_keys; j++) {
        const float *v = values + ((int64_t)block_ids[j / block_size] * block_size + j % block_size) * head_dim;
        const vf p = vf_set1(scores[j]);
        for (int c = 0; c < chunks; c++) acc[c] = vf_fma(p, vf_load(v + 8 * c), acc[c]);
    }
    const vf inverse = vf_set1(inverse_sum);
    for (int c = 0; c < chunks; c++) vf_store(out + 8 * c, vf_mul(acc[c], inverse));
}

/* Rotary embedding on the q and k heads of qkv (fp32, row stride ld), in place, then k and v into
 * the cache, as the AVX-512 path; cos, sin: [rows][head_dim] fp32. x' = x * cos + rotate_half(x) * sin
 * with each product and the sum rounded once (no fused multiply-add), as model.decoder.apply_rope
 * does in fp32: the same bits. */
void hearth_rope_write_kv(float *qkv, int64_t ld, const float *cos, const float *sin, int64_t num_rows,
                          int n_heads, int n_kv_heads, int head_dim, float *keys, float *values,
                          int64_t kv_head_stride, const int64_t *slots, int num_threads) {
    const int half = head_dim / 2;
    #pragma omp parallel for num_threads(num_threads) schedule(static) if (num_rows > 16)
    for (int64_t r = 0; r < num_rows; r++) {
        float *row = qkv + r * ld;
        const float *c = cos + r * head_dim, *s = sin + r * head_dim;
        for (int h = 0; h < n_heads + n_kv_heads; h++) {
            float *x = row + h * head_dim;
            for (int d = 0; d < half; d++) {
                const float x1 = x[d], x2 = x[d + half];
                const float first_cos = x1 * c[d], first_sin = -x2 * s[d];
                const float second_cos = x2 * c[d + half], second_sin = x1 * s[d + half];
                x[d] = first_cos + first_sin;
                x[d + half] = second_cos + second_sin;
            }
        }
        for (int h = 0; h < n_kv_heads; h++) {
            memcpy(keys + h * kv_head_stride + slots[r] * head_dim, row + (n_heads + h) * head_dim, head_dim * 4);
            memcpy(values + h * kv_head_stride + slots[r] * head_dim, row + (n_heads + n_kv_heads + h) * head_dim,
                   head_dim * 4);
        }
    }
}
#endif

/* Both paths: q: [rows] x [n_heads] x head_dim (strides q_row, q_head; head_dim contiguous).
 * keys, values: this layer's [n_kv_heads][slots][head_dim]; kv_head_stride = slots * head_dim.
 * Row r sees positions 0..positions[r] through block_ids[table_offsets[r]...].
 * out: [rows][n_heads][head_dim], contiguous; all in act_t. Returns 0, -1 when out of memory, -2 when
 * head_dim is not a multiple of HEAD_DIM_MULTIPLE (16 bf16, 8 fp32) or is over MAX_HEAD_DIM. */
int hearth_paged_attention(const act_t *q, int64_t q_row, int64_t q_head, const act_t *keys,
                           const act_t *values, int64_t kv_head_stride, const int32_t *block_ids,
                           const int64_t *table_offsets, const int32_t *positions, act_t *out, int64_t num_rows,
                           int n_heads, int n_kv_heads, int head_dim, int block_size, float scale, int num_threads) {
    if (head_dim % HEAD_DIM_MULTIPLE || head_dim > MAX_HEAD_DIM) return -2;
    int64_t max_keys = 1;
    for (int64_t r = 0; r < num_rows; r++) max_keys = positions[r] + 1 > max_keys ? positions[r] + 1 : max_keys;
    const int group = n_heads / n_kv_heads;
    int failed = 0;
    #pragma omp parallel num_threads(num_threads)
    {
        float *scores = aligned_alloc(64, (size_t)((max_keys + 16) * sizeof(float) + 63) / 64 * 64);
        if (!scores) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for collapse(2) schedule(static)
        for (int64_t r = 0; r < num_rows; r++) {
            for (int h = 0; h < n_heads; h++) {
                if (!scores) continue;
                const int64_t kv = h / group;
                attend_one(q + r * q_row + h * q_head, keys + kv * kv_head_stride, values + kv * kv_head_stride,
                           block_ids + table_offsets[r], (int64_t)positions[r] + 1, head_dim, block_size, scale,
                           scores, out + (r * n_heads + h) * head_dim);
            }
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
