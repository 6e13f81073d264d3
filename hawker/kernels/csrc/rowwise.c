/*
 * Row-wise pieces of a decoder layer in one pass each over bfloat16 rows (CPU): RMSNorm,
 * SiLU-and-multiply and the rotary embedding of queries and keys. An eager prompt step otherwise runs
 * each as six, three or four torch ops, every one a pass over memory with its own conversions
 * (benchmarks/NOTES.md, sessions 15 and 16); a compiled step has inductor fuse them instead.
 *
 * Numerics follow hawker/layers (norm.py, activation.py) rounding for rounding: RMSNorm squares and sums
 * in float32, scales in float32, rounds to bfloat16, then multiplies by the weight and rounds again;
 * SiLU rounds to bfloat16 before the product with the up projection, which rounds again. Only the order of
 * the float32 sum of squares (16 lanes, then across them) and exp's last bit differ from torch's, so a
 * result may differ from the torch path's in the last bit; a row's result depends on that row alone.
 * The rotation rounds both products and their sum to bfloat16, as hawker/layers/rotary.py's three ops
 * do, so it gives exactly their bits.
 */
#include "attention_common.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define HAVE_VECTORS 1
#else
#define HAVE_VECTORS 0
#endif

#if HAVE_VECTORS
#include "bf16_vectors.h"

static void rms_norm_row(const uint16_t *x, const uint16_t *weight, uint16_t *out, int64_t size, float eps) {
    __m512 squares = _mm512_setzero_ps();
    for (int64_t i = 0; i < size; i += 16) {
        const __m512 value = load16_bf16(x + i, lanes_below(size - i));
        squares = _mm512_fmadd_ps(value, value, squares);
    }
    const float scale = 1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)size + eps);
    const __m512 factor = _mm512_set1_ps(scale);
    for (int64_t i = 0; i < size; i += 16) {
        const __mmask16 lanes = lanes_below(size - i);
        const __m512 normed = round16_bf16(_mm512_mul_ps(load16_bf16(x + i, lanes), factor));
        store16_bf16(out + i, _mm512_mul_ps(normed, load16_bf16(weight + i, lanes)), lanes);
    }
}

static void silu_and_mul_row(const uint16_t *gate, const uint16_t *up, uint16_t *out, int64_t size) {
    for (int64_t i = 0; i < size; i += 16) {
        const __mmask16 lanes = lanes_below(size - i);
        store16_bf16(out + i, silu_mul16(load16_bf16(gate + i, lanes), load16_bf16(up + i, lanes)), lanes);
    }
}

/* One head of rotate-half rotary: out = x * cos + swap_halves(x) * signed_sin, each product and the sum
 * rounded to bfloat16. */
static void rotate_head(const uint16_t *x, const uint16_t *cos, const uint16_t *signed_sin, uint16_t *out,
                        int64_t dim) {
    const int64_t half = dim / 2;
    for (int64_t i = 0; i < half; i += 16) {
        const __mmask16 lanes = lanes_below(half - i);
        const __m512 low = load16_bf16(x + i, lanes), high = load16_bf16(x + half + i, lanes);
        const __m512 low_out = _mm512_add_ps(round16_bf16(_mm512_mul_ps(low, load16_bf16(cos + i, lanes))),
                                             round16_bf16(_mm512_mul_ps(high, load16_bf16(signed_sin + i, lanes))));
        const __m512 high_out =
            _mm512_add_ps(round16_bf16(_mm512_mul_ps(high, load16_bf16(cos + half + i, lanes))),
                          round16_bf16(_mm512_mul_ps(low, load16_bf16(signed_sin + half + i, lanes))));
        store16_bf16(out + i, low_out, lanes);
        store16_bf16(out + half + i, high_out, lanes);
    }
}

/* The index of the first largest of `size` (>= 1) bfloat16 values, or -1 if one of them is NaN. Each lane keeps
 * the first index of its own largest; the answer is the smallest index among the lanes holding the top. */
static int64_t argmax_row(const uint16_t *x, int64_t size) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 none = _mm512_set1_ps(-INFINITY);
    __m512 best = _mm512_mask_mov_ps(none, lanes_below(size), load16_bf16(x, lanes_below(size)));
    __m512i index = lane;
    __mmask16 nan = _mm512_cmp_ps_mask(best, best, _CMP_UNORD_Q);
    for (int64_t i = 16; i < size; i += 16) {
        const __mmask16 lanes = lanes_below(size - i);
        const __m512 value = _mm512_mask_mov_ps(none, lanes, load16_bf16(x + i, lanes));
        const __mmask16 above = _mm512_cmp_ps_mask(value, best, _CMP_GT_OQ);
        best = _mm512_mask_mov_ps(best, above, value);
        index = _mm512_mask_mov_epi32(index, above, _mm512_add_epi32(lane, _mm512_set1_epi32((int)i)));
        nan |= _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q);
    }
    if (nan) return -1;
    const __mmask16 top = _mm512_cmp_ps_mask(best, _mm512_set1_ps(_mm512_reduce_max_ps(best)), _CMP_EQ_OQ);
    return _mm512_mask_reduce_min_epi32(top, index);
}

#else
static inline float round_bf16(float value) { return bf16_to_float(float_to_bf16(value)); }

static void rotate_head(const uint16_t *x, const uint16_t *cos, const uint16_t *signed_sin, uint16_t *out,
                        int64_t dim) {
    const int64_t half = dim / 2;
    for (int64_t i = 0; i < dim; ++i) {
        const float swapped = bf16_to_float(x[i < half ? i + half : i - half]);
        out[i] = float_to_bf16(round_bf16(bf16_to_float(x[i]) * bf16_to_float(cos[i])) +
                               round_bf16(swapped * bf16_to_float(signed_sin[i])));
    }
}

static void rms_norm_row(const uint16_t *x, const uint16_t *weight, uint16_t *out, int64_t size, float eps) {
    float squares = 0.0f;
    for (int64_t i = 0; i < size; ++i) squares += bf16_to_float(x[i]) * bf16_to_float(x[i]);
    const float scale = 1.0f / sqrtf(squares / (float)size + eps);
    for (int64_t i = 0; i < size; ++i)
        out[i] = float_to_bf16(round_bf16(bf16_to_float(x[i]) * scale) * bf16_to_float(weight[i]));
}

static void silu_and_mul_row(const uint16_t *gate, const uint16_t *up, uint16_t *out, int64_t size) {
    for (int64_t i = 0; i < size; ++i) {
        const float g = bf16_to_float(gate[i]), e = exp_nonpositive(-fabsf(g));
        const float silu = round_bf16(g * ((g >= 0.0f ? 1.0f : e) / (1.0f + e)));
        out[i] = float_to_bf16(silu * bf16_to_float(up[i]));
    }
}

static int64_t argmax_row(const uint16_t *x, int64_t size) {
    int64_t found = 0;
    float best = bf16_to_float(x[0]);
    for (int64_t i = 0; i < size; ++i) {
        const float value = bf16_to_float(x[i]);
        if (value != value) return -1;
        if (value > best) best = value, found = i;
    }
    return found;
}
#endif

/* x: [rows, size] bfloat16, rows x_stride elements apart; out: [rows, size] contiguous. */
int hawker_rms_norm(const uint16_t *x, int64_t x_stride, const uint16_t *weight, uint16_t *out, int64_t rows,
                    int64_t size, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * size >= 65536)
    for (int64_t r = 0; r < rows; ++r) rms_norm_row(x + r * x_stride, weight, out + r * size, size, eps);
    return 0;
}

/* gate_up: [rows, 2 * size] bfloat16 (gate | up), rows stride elements apart; out: [rows, size] contiguous. */
int hawker_silu_and_mul(const uint16_t *gate_up, int64_t stride, uint16_t *out, int64_t rows, int64_t size,
                        int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * size >= 65536)
    for (int64_t r = 0; r < rows; ++r) silu_and_mul_row(gate_up + r * stride, gate_up + r * stride + size, out + r * size, size);
    return 0;
}

/* x: [tokens, heads, dim] bfloat16, tokens x_stride elements apart, heads contiguous; cos, signed_sin:
 * [tokens, dim] bfloat16; out: [tokens, heads, dim] contiguous. dim is even. */
int hawker_rotary(const uint16_t *x, int64_t x_stride, const uint16_t *cos, const uint16_t *signed_sin, uint16_t *out,
                  int64_t tokens, int64_t heads, int64_t dim, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (tokens * heads * dim >= 65536)
    for (int64_t t = 0; t < tokens; ++t)
        for (int64_t h = 0; h < heads; ++h)
            rotate_head(x + t * x_stride + h * dim, cos + t * dim, signed_sin + t * dim, out + (t * heads + h) * dim, dim);
    return 0;
}

/* x: [rows, size] bfloat16 (size >= 1), rows x_stride elements apart; out[r]: the first index of row r's largest
 * value, as torch.max(dim=-1).indices gives it. Returns 1 (out unfinished) if a value is NaN, else 0. */
int hawker_argmax_rows(const uint16_t *x, int64_t x_stride, int64_t *out, int64_t rows, int64_t size, int threads) {
    int nan = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : nan) if (rows * size >= 65536)
    for (int64_t r = 0; r < rows; ++r) {
        out[r] = argmax_row(x + r * x_stride, size);
        nan |= out[r] < 0;
    }
    return nan;
}
