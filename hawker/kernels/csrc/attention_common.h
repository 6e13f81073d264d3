/*
 * What the CPU attention kernels share: dtype codes (as the Python wrappers in hawker/kernels pass
 * them), bfloat16 conversions that round as torch does, 8-bit float cache elements widened exactly,
 * and a vectorisable exp.
 */
#ifndef HAWKER_ATTENTION_COMMON_H
#define HAWKER_ATTENTION_COMMON_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The 8-bit floats are KV cache elements only (kv_cache_dtype "fp8_e4m3", "fp8_e5m2"), never queries. */
enum { DTYPE_FLOAT32 = 0, DTYPE_BFLOAT16 = 1, DTYPE_FLOAT16 = 2, DTYPE_FLOAT8_E4M3 = 3, DTYPE_FLOAT8_E5M2 = 4 };

static inline int is_float8(int dtype) { return dtype == DTYPE_FLOAT8_E4M3 || dtype == DTYPE_FLOAT8_E5M2; }

/*
 * An 8-bit float's bits as a float16's. e5m2 is float16's top byte. e4m3's exponent and mantissa,
 * moved into float16's places, read as its value times 2^-8 (the biases differ by 8), subnormals
 * included; FLOAT8_E4M3_FACTOR undoes that. Exact either way (float16 holds every such value).
 */
#define FLOAT8_E4M3_FACTOR 256.0f

static inline size_t element_size(int dtype) { return dtype == DTYPE_FLOAT32 ? 4 : is_float8(dtype) ? 1 : 2; }

static inline uint16_t float8_half_bits(uint8_t byte, int dtype) {
    if (dtype == DTYPE_FLOAT8_E5M2) return (uint16_t)((uint16_t)byte << 8);
    return (uint16_t)(((uint16_t)(byte & 0x80u) << 8) | ((uint16_t)(byte & 0x7fu) << 7));
}

static inline float float8_to_float(uint8_t byte, int dtype) {
    const uint16_t bits = float8_half_bits(byte, dtype);
    _Float16 half;
    memcpy(&half, &bits, sizeof half);
    return dtype == DTYPE_FLOAT8_E5M2 ? (float)half : (float)half * FLOAT8_E4M3_FACTOR;
}

static inline float bf16_to_float(uint16_t half) {
    uint32_t bits = (uint32_t)half << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline uint16_t float_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u); /* round to nearest even, as torch does */
    return (uint16_t)(bits >> 16);
}

/* Row of `dim` elements of `dtype` at `src` into floats. */
static inline void load_row(const void *src, int dtype, int64_t dim, float *restrict dst) {
    if (dtype == DTYPE_BFLOAT16) {
        const uint16_t *row = (const uint16_t *)src;
        for (int64_t d = 0; d < dim; ++d) dst[d] = bf16_to_float(row[d]);
    } else if (dtype == DTYPE_FLOAT16) {
        const _Float16 *row = (const _Float16 *)src;
        for (int64_t d = 0; d < dim; ++d) dst[d] = (float)row[d];
    } else if (is_float8(dtype)) {
        const uint8_t *row = (const uint8_t *)src;
        for (int64_t d = 0; d < dim; ++d) dst[d] = float8_to_float(row[d], dtype);
    } else {
        memcpy(dst, src, (size_t)dim * sizeof(float));
    }
}

/* Row of `dim` cache elements of `dtype` as bfloat16 bits: the same bits for bfloat16, exact for the
 * 8-bit floats (their values all fit), rounded from float16 and float32. */
static inline void load_row_bf16(const void *src, int dtype, int64_t dim, uint16_t *restrict dst) {
    if (dtype == DTYPE_BFLOAT16) {
        memcpy(dst, src, (size_t)dim * sizeof(uint16_t));
        return;
    }
    float row[dim];
    load_row(src, dtype, dim, row);
    for (int64_t d = 0; d < dim; ++d) dst[d] = float_to_bf16(row[d]);
}

static inline void store_row(void *dst, int dtype, int64_t dim, const float *restrict src, float factor) {
    if (dtype == DTYPE_BFLOAT16) {
        uint16_t *row = (uint16_t *)dst;
        for (int64_t d = 0; d < dim; ++d) row[d] = float_to_bf16(src[d] * factor);
    } else if (dtype == DTYPE_FLOAT16) {
        _Float16 *row = (_Float16 *)dst;
        for (int64_t d = 0; d < dim; ++d) row[d] = (_Float16)(src[d] * factor);
    } else {
        float *row = (float *)dst;
        for (int64_t d = 0; d < dim; ++d) row[d] = src[d] * factor;
    }
}

/*
 * exp(x) for x <= 0 (scores minus their maximum), Cephes' single-precision
 * polynomial: about 1 ulp, and unlike libm's expf it vectorises.
 */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* exp_nonpositive on 16 lanes: the same polynomial, 2^n applied by vscalefps. */
static inline __m512 exp16_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, n);
}

static inline __mmask16 lanes_below(int64_t count) { return count >= 16 ? 0xffff : (__mmask16)((1u << count) - 1); }
#endif

/*
 * Softmax weights of one row, unnormalised, in place: exp(s - max) over the first
 * `valid` scores, exact zeros from there up to `padded`; returns their sum. The
 * order of every sum depends on `valid` alone, so a row's result does too.
 */
static inline float softmax_row(float *scores, int64_t valid, int64_t padded) {
#if defined(__AVX512F__)
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < valid; t += 16)
        top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, lanes_below(valid - t), scores + t));
    const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 total = _mm512_setzero_ps();
    int64_t t = 0;
    for (; t < valid; t += 16) {
        const __mmask16 mask = lanes_below(valid - t);
        const __m512 weights = _mm512_maskz_mov_ps(mask, exp16_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, scores + t), shift)));
        _mm512_mask_storeu_ps(scores + t, lanes_below(padded - t), weights);
        total = _mm512_add_ps(total, weights);
    }
    for (; t < padded; ++t) scores[t] = 0.0f;
    return _mm512_reduce_add_ps(total);
#else
    float top = -INFINITY;
    for (int64_t t = 0; t < valid; ++t) top = scores[t] > top ? scores[t] : top;
    float total = 0.0f;
    for (int64_t t = 0; t < valid; ++t) {
        scores[t] = exp_nonpositive(scores[t] - top);
        total += scores[t];
    }
    for (int64_t t = valid; t < padded; ++t) scores[t] = 0.0f;
    return total;
#endif
}

#endif
