/* The fp32 path's vector helpers: 8 fp32 lanes as one type, for x86-64 AVX2 + FMA and ARM64 NEON.
 *
 * Hearth's kernels for CPUs without a native bf16 dot product (x86-64-v3, ARM64) keep activations
 * and the KV cache in fp32 and read weights in bf16, int8 or int4, converted to fp32 in registers.
 * Every kernel of that path is written once over these helpers; only this file knows the ISA.
 *
 * Design choices:
 * - 8 lanes everywhere (one __m256 on AVX2, two float32x4_t on NEON), so a packed weight has one
 *   layout on every ISA and the kernels' loops, and so their arithmetic, are the same: a lane's
 *   result is the same sequence of fused multiply-adds in the same order on both.
 * - `vf_fma(a, b, c)` is one fused a * b + c on both ISAs; `vf_mul` and `vf_add` are single
 *   roundings (the kernels are compiled with -ffp-contract=off so the compiler fuses nothing else).
 * - Weight words are 32 bits a lane: a pair of bf16 (`vi_bf16_even`/`_odd`), or four int8 or eight
 *   int4 codes of one output row, decoded by shifts and masks that are exact.
 * - `vf_sum` adds the 8 lanes in one fixed order.
 */
#ifndef HEARTH_VEC_H
#define HEARTH_VEC_H

#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

typedef __m256 vf;  /* 8 fp32 lanes */
typedef __m256i vi; /* 8 32-bit lanes */

static inline vf vf_zero(void) { return _mm256_setzero_ps(); }
static inline vf vf_set1(float x) { return _mm256_set1_ps(x); }
static inline vf vf_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void vf_store(float *p, vf v) { _mm256_storeu_ps(p, v); }
static inline vf vf_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vf_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vf_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vf_div(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vf_max(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vf_abs(vf a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
/* lanes where a < b take `then`, the others `otherwise` */
static inline vf vf_select_lt(vf a, vf b, vf then, vf otherwise) {
    return _mm256_blendv_ps(otherwise, then, _mm256_cmp_ps(a, b, _CMP_LT_OQ));
}
static inline vf vf_round(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* 2^n for integral n in [-126, 127] (an exponent field) */
static inline vf vf_exp2i(vf n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
/* (l0 + l4) + (l2 + l6), (l1 + l5) + (l3 + l7), then the two */
static inline float vf_sum(vf v) {
    const __m128 quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
}

static inline vi vi_load(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
/* the bf16 in the low / high half of each word, as fp32 (exact) */
static inline vf vi_bf16_low(vi w) { return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)); }
static inline vf vi_bf16_high(vi w) { return _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32((int)0xffff0000u))); }
/* 8 int8 (one per lane) at p, as fp32 */
static inline vf vf_from_int8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
/* 8 bf16 at p (one per lane) as fp32 */
static inline vf vf_from_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
/* nibble `j` (bits 4j..4j+3) of each word, as fp32 0..15 */
#define VI_NIBBLE(w, j) \
    _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32((w), 4 * (j)), _mm256_set1_epi32(15)))

#elif defined(__ARM_NEON)
#include <arm_neon.h>

typedef struct { float32x4_t lo, hi; } vf;
typedef struct { uint32x4_t lo, hi; } vi;

static inline vf vf_make(float32x4_t lo, float32x4_t hi) { vf v = {lo, hi}; return v; }
static inline vf vf_zero(void) { return vf_make(vdupq_n_f32(0), vdupq_n_f32(0)); }
static inline vf vf_set1(float x) { return vf_make(vdupq_n_f32(x), vdupq_n_f32(x)); }
static inline vf vf_load(const float *p) { return vf_make(vld1q_f32(p), vld1q_f32(p + 4)); }
static inline void vf_store(float *p, vf v) { vst1q_f32(p, v.lo); vst1q_f32(p + 4, v.hi); }
static inline vf vf_fma(vf a, vf b, vf c) { return vf_make(vfmaq_f32(c.lo, a.lo, b.lo), vfmaq_f32(c.hi, a.hi, b.hi)); }
static inline vf vf_add(vf a, vf b) { return vf_make(vaddq_f32(a.lo, b.lo), vaddq_f32(a.hi, b.hi)); }
static inline vf vf_sub(vf a, vf b) { return vf_make(vsubq_f32(a.lo, b.lo), vsubq_f32(a.hi, b.hi)); }
static inline vf vf_mul(vf a, vf b) { return vf_make(vmulq_f32(a.lo, b.lo), vmulq_f32(a.hi, b.hi)); }
static inline vf vf_div(vf a, vf b) { return vf_make(vdivq_f32(a.lo, b.lo), vdivq_f32(a.hi, b.hi)); }
static inline vf vf_max(vf a, vf b) { return vf_make(vmaxnmq_f32(a.lo, b.lo), vmaxnmq_f32(a.hi, b.hi)); }
static inline vf vf_abs(vf a) { return vf_make(vabsq_f32(a.lo), vabsq_f32(a.hi)); }
static inline vf vf_select_lt(vf a, vf b, vf then, vf otherwise) {
    return vf_make(vbslq_f32(vcltq_f32(a.lo, b.lo), then.lo, otherwise.lo),
                   vbslq_f32(vcltq_f32(a.hi, b.hi), then.hi, otherwise.hi));
}
static inline vf vf_round(vf a) { return vf_make(vrndnq_f32(a.lo), vrndnq_f32(a.hi)); }
static inline float32x4_t exp2i_half(float32x4_t n) {
    return vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127)), 23));
}
static inline vf vf_exp2i(vf n) { return vf_make(exp2i_half(n.lo), exp2i_half(n.hi)); }
/* the same order as AVX2's: lanes l and l + 4 first */
static inline float vf_sum(vf v) {
    const float32x4_t quad = vaddq_f32(v.lo, v.hi);                                   /* l0+l4 .. l3+l7 */
    const float32x2_t pair = vadd_f32(vget_low_f32(quad), vget_high_f32(quad));       /* (0+2), (1+3) */
    return vget_lane_f32(pair, 0) + vget_lane_f32(pair, 1);
}

static inline vi vi_load(const void *p) {
    vi v = {vld1q_u32((const uint32_t *)p), vld1q_u32((const uint32_t *)p + 4)};
    return v;
}
static inline vf vi_bf16_low(vi w) { return vf_make(vreinterpretq_f32_u32(vshlq_n_u32(w.lo, 16)), vreinterpretq_f32_u32(vshlq_n_u32(w.hi, 16))); }
static inline vf vi_bf16_high(vi w) {
    const uint32x4_t mask = vdupq_n_u32(0xffff0000u);
    return vf_make(vreinterpretq_f32_u32(vandq_u32(w.lo, mask)), vreinterpretq_f32_u32(vandq_u32(w.hi, mask)));
}
static inline vf vf_from_int8(const int8_t *p) {
    const int16x8_t wide = vmovl_s8(vld1_s8(p));
    return vf_make(vcvtq_f32_s32(vmovl_s16(vget_low_s16(wide))), vcvtq_f32_s32(vmovl_s16(vget_high_s16(wide))));
}
static inline vf vf_from_bf16(const uint16_t *p) {
    const uint16x8_t bits = vld1q_u16(p);
    return vf_make(vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(bits), 16)),
                   vreinterpretq_f32_u32(vshll_n_u16(vget_high_u16(bits), 16)));
}
static inline vf vi_nibble(vi w, int j) {
    const uint32x4_t mask = vdupq_n_u32(15);
    const int32x4_t shift = vdupq_n_s32(-4 * j);
    return vf_make(vcvtq_f32_u32(vandq_u32(vshlq_u32(w.lo, shift), mask)),
                   vcvtq_f32_u32(vandq_u32(vshlq_u32(w.hi, shift), mask)));
}
#define VI_NIBBLE(w, j) vi_nibble((w), (j))

#else
#error "vec.h needs AVX2 + FMA or NEON"
#endif

/* Stores a vector of outputs, only the first `left` when a tile passes N (the linears' lanes are
 * output rows). */
static inline void store_outputs(float *y, vf v, int64_t left) {
    if (left >= 8) { vf_store(y, v); return; }
    float lanes[8];
    vf_store(lanes, v);
    for (int64_t i = 0; i < left; i++) y[i] = lanes[i];
}

/* Tiles in one thread's block of a linear: one for a few rows (no reuse to gain, an even split of
 * the tiles); for more, as many as fit ~256 KB, so the block stays in L2 while every 4 rows of X
 * meet it. */
static inline int64_t tiles_per_block(int64_t m_size, int64_t tile_bytes) {
    if (m_size <= 4) return 1;
    const int64_t tiles = (256 << 10) / tile_bytes;
    return tiles > 1 ? tiles : 1;
}

/* exp(x) for x <= 0: 2^n * e^f with n = round(x / ln 2) and f = x - n ln 2 (ln 2 in two parts,
 * Cody and Waite, so f stays exact for large |x|), |f| <= 0.35, e^f by a degree-6 polynomial
 * (relative error ~2e-7); x clamped at -87 so 2^n stays a normal number (exp(-87) ~ 1.6e-38: what
 * a softmax weight or a silu that small adds is below fp32's resolution of the result). */
static inline vf vf_exp_nonpositive(vf x) {
    x = vf_max(x, vf_set1(-87.0f));
    const vf n = vf_round(vf_mul(x, vf_set1(1.44269504088896341f)));
    vf f = vf_fma(n, vf_set1(-0.693359375f), x);     /* ln 2's high part: exact in 10 bits */
    f = vf_fma(n, vf_set1(2.12194440e-4f), f);        /* and the rest */
    vf p = vf_set1(1.0f / 720);
    p = vf_fma(p, f, vf_set1(1.0f / 120));
    p = vf_fma(p, f, vf_set1(1.0f / 24));
    p = vf_fma(p, f, vf_set1(1.0f / 6));
    p = vf_fma(p, f, vf_set1(0.5f));
    p = vf_fma(p, f, vf_set1(1.0f));
    p = vf_fma(p, f, vf_set1(1.0f));
    return vf_mul(p, vf_exp2i(n));
}

#endif
