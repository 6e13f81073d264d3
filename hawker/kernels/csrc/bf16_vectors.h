/*
 * bfloat16 rows 16 lanes at a time, and SwiGLU's rounding (CPU, AVX512-BF16): shared by the row-wise
 * kernels (rowwise.c) and the AMX matmul's fused gate | up epilogue (amx_linear.c), so that both give the
 * same bits. Include after attention_common.h (exp16_nonpositive) where __AVX512BF16__ is defined.
 */
#ifndef HAWKER_BF16_VECTORS_H
#define HAWKER_BF16_VECTORS_H

#include <immintrin.h>
#include <stdint.h>

static inline __m512 load16_bf16(const uint16_t *src, __mmask16 lanes) {
    const __m256i bits = _mm256_maskz_loadu_epi16(lanes, src);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

/* Round to bfloat16, to nearest even (vcvtneps2bf16, as float_to_bf16 and torch round). */
static inline __m512 round16_bf16(__m512 value) {
    const __m256i bits = (__m256i)_mm512_cvtneps_pbh(value);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

static inline void store16_bf16(uint16_t *dst, __m512 value, __mmask16 lanes) {
    _mm256_mask_storeu_epi16(dst, lanes, (__m256i)_mm512_cvtneps_pbh(value));
}

/* silu(g) * up for bfloat16 values g and up (as floats), before the product's rounding: silu(g) = g *
 * sigmoid(g), sigmoid from exp(-|g|) <= 1 (exp16_nonpositive's range), rounded to bfloat16 before the product
 * as hawker/layers/activation.py's two torch ops do. */
static inline __m512 silu_mul16(__m512 g, __m512 up) {
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 e = exp16_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
    const __m512 numerator = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_GE_OQ), e, one);
    return _mm512_mul_ps(round16_bf16(_mm512_mul_ps(g, _mm512_div_ps(numerator, _mm512_add_ps(one, e)))), up);
}

#endif
