/*
 * y = x @ W^T for a weight stored as 4- or 8-bit codes per group of 32 inputs, by 8-bit integer dot
 * products (CPU, AVX512-VNNI): the way llama.cpp multiplies GGUF's Q4_1 and Q8_0 weights.
 *
 * Weight: w = d * u + m per group of 32 inputs of one output, u unsigned (0..15 for Q4_1's codes,
 * code + 128 for Q8_0's, whose m is -128 d), d and m float16. Packed once
 * (hawker/kernels/int8_dot_linear.py) in panels of PANEL = 16 outputs, one block per group:
 *   4 bits: four 64-byte vectors; byte b of vector c holds u[out 16p + b/4][in 32g + 8c + b%4] in its
 *           low nibble and u[out 16p + b/4][in 32g + 8c + 4 + b%4] in its high nibble;
 *   8 bits: eight 64-byte vectors; byte b of vector c holds u[out 16p + b/4][in 32g + 4c + b%4];
 * then the panel's 16 d and 16 m (64 bytes). Each vector is what one vpdpbusd takes: 16 outputs
 * (its int32 lanes) by 4 consecutive inputs.
 *
 * Activations: each row is quantised on its own per group of 32, q = round(x / a) with a = max|x| / 127
 * (llama.cpp's Q8 activations), and the group's sum s = a * sum(q) kept for the offsets:
 *   sum over the group of w * x ~= d * a * sum(u * q) + m * s.
 * So the products are exact integers; the only rounding beyond float32's is the activations' to 8 bits.
 *
 * Why: a decode step of few rows reads every weight once; these codes are a quarter (4-bit) or half
 * (8-bit) of bfloat16's bytes, and one vpdpbusd does 64 multiply-adds where a float32 FMA does 16,
 * so steps of many rows gain too. torch's int4 kernel (float activations) is bound by instructions
 * on the machines measured (benchmarks/NOTES.md).
 *
 * Numerics: each output is its row's groups summed in input order in float32; a row's result depends
 * only on that row and W, whatever the number of rows, the chunking or the thread.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>

enum { PANEL = 16, GROUP = 32, ROWS_MAX = 8, ROW_BLOCK = 256, SCALE_BYTES = 64 };
enum { DTYPE_FLOAT32 = 0, DTYPE_BFLOAT16 = 1 };

/* How far ahead of the block in use the weight stream is fetched. A thread reads its panels in one
 * contiguous run, but on its own one core keeps too few misses in flight to reach the memory's
 * bandwidth: one row's projections of the default model, 30 layers cycled, 2 threads, went from
 * 3.2-5.7 ms to 2.3-2.4 ms (28 GB/s, partly from L3) at 5 KB ahead; 2.5 KB was slower, 10-20 KB no faster
 * (benchmarks/NOTES.md). Past the last panel the hint reads nothing that faults. */
enum { PREFETCH_BYTES = 5120 };

static inline int64_t block_bytes(int bits) { return (bits == 4 ? 4 : 8) * 64 + SCALE_BYTES; }

/* 16 inputs of a row as float32, from float32 or bfloat16 (a bfloat16 is the high half of its float32). */
static inline __m512 load_row16(const void *row, int64_t i, int dtype) {
    if (dtype == DTYPE_BFLOAT16) {
        const __m256i halves = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
    }
    return _mm512_loadu_ps((const float *)row + i);
}

/* One row's groups of 32 as int8 codes, each group's step a and sum s = a * sum(codes). */
static void quantize_row(const void *row, int dtype, int64_t in_features, int8_t *codes, float *step,
                         float *sum) {
    for (int64_t g = 0; g < in_features / GROUP; ++g) {
        const __m512 first = load_row16(row, g * GROUP, dtype);
        const __m512 second = load_row16(row, g * GROUP + 16, dtype);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(first), _mm512_abs_ps(second)));
        const float a = amax / 127.0f;
        const __m512 inverse = _mm512_set1_ps(a > 0.0f ? 1.0f / a : 0.0f);
        /* Round to nearest even (the default rounding mode); |q| <= 127, so the narrowing is exact. */
        const __m512i q_first = _mm512_cvtps_epi32(_mm512_mul_ps(first, inverse));
        const __m512i q_second = _mm512_cvtps_epi32(_mm512_mul_ps(second, inverse));
        _mm_storeu_si128((__m128i *)(codes + g * GROUP), _mm512_cvtsepi32_epi8(q_first));
        _mm_storeu_si128((__m128i *)(codes + g * GROUP + 16), _mm512_cvtsepi32_epi8(q_second));
        step[g] = a;
        sum[g] = a * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q_first, q_second));
    }
}

static inline __m512i broadcast4(const int8_t *codes) {
    int32_t four;
    memcpy(&four, codes, 4);
    return _mm512_set1_epi32(four);
}

/* One panel (16 outputs) for ROWS rows over all groups; accumulators in registers. */
static inline __attribute__((always_inline)) void panel_rows(const uint8_t *panel, int bits, int64_t groups,
                                                              const int8_t *codes, const float *steps,
                                                              const float *sums, int64_t in_features, int rows,
                                                              __m512 *result) {
    const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
    const int64_t data_bytes = block_bytes(bits) - SCALE_BYTES;
    __m512 acc[ROWS_MAX];
    for (int r = 0; r < rows; ++r)
        acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
        const uint8_t *block = panel + g * block_bytes(bits);
        for (int64_t line = 0; line < block_bytes(bits); line += 64)
            _mm_prefetch((const char *)block + PREFETCH_BYTES + line, _MM_HINT_T0);
        __m512i dot_even[ROWS_MAX], dot_odd[ROWS_MAX];
        for (int r = 0; r < rows; ++r) {
            dot_even[r] = _mm512_setzero_si512();
            dot_odd[r] = _mm512_setzero_si512();
        }
        if (bits == 4) {
            for (int c = 0; c < 4; ++c) {
                const __m512i packed = _mm512_loadu_si512(block + c * 64);
                const __m512i first = _mm512_and_si512(packed, low_nibbles);
                const __m512i second = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low_nibbles);
                for (int r = 0; r < rows; ++r) {
                    const int8_t *q = codes + r * in_features + g * GROUP + 8 * c;
                    dot_even[r] = _mm512_dpbusd_epi32(dot_even[r], first, broadcast4(q));
                    dot_odd[r] = _mm512_dpbusd_epi32(dot_odd[r], second, broadcast4(q + 4));
                }
            }
        } else {
            for (int c = 0; c < 8; c += 2) {
                const __m512i first = _mm512_loadu_si512(block + c * 64);
                const __m512i second = _mm512_loadu_si512(block + (c + 1) * 64);
                for (int r = 0; r < rows; ++r) {
                    const int8_t *q = codes + r * in_features + g * GROUP + 4 * c;
                    dot_even[r] = _mm512_dpbusd_epi32(dot_even[r], first, broadcast4(q));
                    dot_odd[r] = _mm512_dpbusd_epi32(dot_odd[r], second, broadcast4(q + 4));
                }
            }
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(block + data_bytes)));
        const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(block + data_bytes + 32)));
        for (int r = 0; r < rows; ++r) {
            const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(dot_even[r], dot_odd[r]));
            const int64_t at = r * (in_features / GROUP) + g;
            acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(d, _mm512_set1_ps(steps[at])), acc[r]);
            acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(sums[at]), acc[r]);
        }
    }
    for (int r = 0; r < rows; ++r)
        result[r] = acc[r];
}

static void store16(void *out, int dtype, __m512 values, __mmask16 mask) {
    if (dtype == DTYPE_BFLOAT16) {
        /* Round to nearest even, as torch rounds float32 to bfloat16 (NaN kept a NaN); by hand, since
         * this kernel needs only AVX512-VNNI, not AVX512-BF16's vcvtneps2bf16. */
        const __m512i bits = _mm512_castps_si512(values);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
        const __mmask16 nan = _mm512_cmp_ps_mask(values, values, _CMP_UNORD_Q);
        const __m512i high = _mm512_mask_mov_epi32(_mm512_srli_epi32(rounded, 16), nan,
                                                   _mm512_set1_epi32(0x7FC0));
        _mm256_mask_storeu_epi16(out, mask, _mm512_cvtepi32_epi16(high));
    } else {
        _mm512_mask_storeu_ps(out, mask, values);
    }
}

#define ROWS_CASE(n)                                                                                   \
    case n:                                                                                            \
        panel_rows(panel, bits, groups, codes, steps, sums, in_features, n, result);                   \
        break;

/* A chunk of up to ROWS_MAX rows; the row count a compile-time constant so the loops unroll. */
static void panel_chunk(const uint8_t *panel, int bits, int64_t groups, const int8_t *codes,
                        const float *steps, const float *sums, int64_t in_features, int rows,
                        __m512 *result) {
    switch (rows) {
        ROWS_CASE(1)
        ROWS_CASE(2)
        ROWS_CASE(3)
        ROWS_CASE(4)
        ROWS_CASE(5)
        ROWS_CASE(6)
        ROWS_CASE(7)
        ROWS_CASE(8)
    default:
        break;
    }
}

/*
 * x: [rows, in] (row stride x_stride elements, dtype 0 float32 / 1 bfloat16); packed as above with
 * ceil(out / 16) panels; out: [rows, out_features] (row stride out_stride, the same dtype).
 * in must be a multiple of 32. Returns 0, -1 on a bad argument, -2 when out of memory.
 */
int hawker_int8_dot_linear(const void *x, int64_t x_stride, const uint8_t *packed, int bits, void *out,
                           int64_t out_stride, int64_t rows, int64_t in_features, int64_t out_features,
                           int dtype, int threads) {
    if ((bits != 4 && bits != 8) || in_features % GROUP || (dtype != DTYPE_FLOAT32 && dtype != DTYPE_BFLOAT16))
        return -1;
    const int64_t groups = in_features / GROUP;
    const int64_t panels = (out_features + PANEL - 1) / PANEL;
    const int64_t panel_bytes = groups * block_bytes(bits);
    const int element = dtype == DTYPE_BFLOAT16 ? 2 : 4;
    int8_t *codes = malloc((size_t)(rows * in_features));
    float *steps = malloc((size_t)(rows * groups) * sizeof(float));
    float *sums = malloc((size_t)(rows * groups) * sizeof(float));
    if (!codes || !steps || !sums) {
        free(codes), free(steps), free(sums);
        return -2;
    }
    /* Rows split into equal chunks of at most ROWS_MAX (a small last chunk hides less latency). */
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r)
            quantize_row((const char *)x + r * x_stride * element, dtype, in_features, codes + r * in_features,
                         steps + r * groups, sums + r * groups);
        /* Blocks of rows whose codes stay in L2 while every panel passes over them. */
        for (int64_t block = 0; block < rows; block += ROW_BLOCK) {
            const int64_t block_rows = rows - block < ROW_BLOCK ? rows - block : ROW_BLOCK;
            const int64_t chunks = (block_rows + ROWS_MAX - 1) / ROWS_MAX;
            const int64_t chunk_rows = (block_rows + chunks - 1) / chunks;
#pragma omp for schedule(static)
            for (int64_t j = 0; j < panels; ++j) {
                const uint8_t *panel = packed + j * panel_bytes;
                const int64_t first = j * PANEL;
                const int64_t valid = out_features - first;
                const __mmask16 mask = valid >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1);
                for (int64_t r = block; r < block + block_rows; r += chunk_rows) {
                    const int chunk = (int)(block + block_rows - r < chunk_rows ? block + block_rows - r : chunk_rows);
                    __m512 result[ROWS_MAX];
                    panel_chunk(panel, bits, groups, codes + r * in_features, steps + r * groups, sums + r * groups,
                                in_features, chunk, result);
                    for (int i = 0; i < chunk; ++i)
                        store16((char *)out + ((r + i) * out_stride + first) * element, dtype, result[i], mask);
                }
            }
        }
    }
    free(codes), free(steps), free(sums);
    return 0;
}

int hawker_int8_dot_linear_built(void) { return 1; }

#else

int hawker_int8_dot_linear(const void *x, int64_t x_stride, const uint8_t *packed, int bits, void *out,
                           int64_t out_stride, int64_t rows, int64_t in_features, int64_t out_features,
                           int dtype, int threads) {
    (void)x, (void)x_stride, (void)packed, (void)bits, (void)out, (void)out_stride, (void)rows,
        (void)in_features, (void)out_features, (void)dtype, (void)threads;
    return -1;
}

int hawker_int8_dot_linear_built(void) { return 0; }

#endif
