/*
 * y = x @ W^T for a bfloat16 weight W, with float32 sums (CPU, AVX-512).
 *
 * W is packed once (hawker/kernels/panel_linear.py) into panels of PANEL = 32
 * outputs: [out / 32][in / 2][32][2], so each pair of inputs of a panel is
 * two 64-byte vectors read in order. A bfloat16 is the high half of its
 * float32, so one shift and one mask widen a vector into the panel's weights
 * for the first and the second input of the pair; each row's inputs arrive
 * widened to float32 and are broadcast. A panel's 32 outputs for up to
 * ROWS_MAX rows live in registers (2 x ROWS_MAX accumulators), and the
 * panel's weights stay in L1/L2 while every chunk of rows passes over them.
 *
 * Why not AVX512-BF16's vdpbf16ps: on the machines measured it runs at half
 * the rate of two float32 FMAs (benchmarks/NOTES.md). Why not oneDNN: on CPUs
 * with AVX512-BF16 but no AMX its bfloat16 matmul is slow, and its float32
 * one reads a float32 copy, twice the bytes, which bounds a decode step of
 * 16-64 rows.
 *
 * Numerics: each output is its row's products summed in input order by
 * float32 FMAs (each product of two bfloat16 values is exact in float32),
 * rounded once to bfloat16 at the end (round to nearest even). A row's
 * result depends only on that row and W: the same bits whatever the number
 * of rows, the chunking or the thread.
 */
#include <stdint.h>
#include <string.h>

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

enum { PANEL = 32, ROWS_MAX = 10 };

/* One panel (32 outputs) for ROWS rows: all of k, accumulators in registers. */
static inline __attribute__((always_inline)) void panel_rows(const float *x, int64_t x_stride,
                                                              const uint16_t *panel, uint16_t *out,
                                                              int64_t out_stride, int64_t pairs, int rows,
                                                              __mmask16 mask_lo, __mmask16 mask_hi) {
    const __m512i high_half = _mm512_set1_epi32((int32_t)0xFFFF0000u);
    __m512 acc_lo[ROWS_MAX], acc_hi[ROWS_MAX];
    for (int r = 0; r < rows; ++r) {
        acc_lo[r] = _mm512_setzero_ps();
        acc_hi[r] = _mm512_setzero_ps();
    }
    for (int64_t p = 0; p < pairs; ++p) {
        /* 16 outputs x 2 inputs per vector; a bfloat16 is the high half of its float32. */
        const __m512i w_lo = _mm512_loadu_si512(panel + p * 2 * PANEL);
        const __m512i w_hi = _mm512_loadu_si512(panel + p * 2 * PANEL + PANEL);
        const __m512 lo_first = _mm512_castsi512_ps(_mm512_slli_epi32(w_lo, 16));
        const __m512 lo_second = _mm512_castsi512_ps(_mm512_and_si512(w_lo, high_half));
        const __m512 hi_first = _mm512_castsi512_ps(_mm512_slli_epi32(w_hi, 16));
        const __m512 hi_second = _mm512_castsi512_ps(_mm512_and_si512(w_hi, high_half));
        for (int r = 0; r < rows; ++r) {
            const float *row = x + r * x_stride + 2 * p;
            const __m512 first = _mm512_set1_ps(row[0]);
            const __m512 second = _mm512_set1_ps(row[1]);
            acc_lo[r] = _mm512_fmadd_ps(lo_first, first, acc_lo[r]);
            acc_hi[r] = _mm512_fmadd_ps(hi_first, first, acc_hi[r]);
            acc_lo[r] = _mm512_fmadd_ps(lo_second, second, acc_lo[r]);
            acc_hi[r] = _mm512_fmadd_ps(hi_second, second, acc_hi[r]);
        }
    }
    for (int r = 0; r < rows; ++r) {
        uint16_t *row = out + r * out_stride;
        _mm256_mask_storeu_epi16(row, mask_lo, (__m256i)_mm512_cvtneps_pbh(acc_lo[r]));
        _mm256_mask_storeu_epi16(row + 16, mask_hi, (__m256i)_mm512_cvtneps_pbh(acc_hi[r]));
    }
}

/* The row count as a compile-time constant, so each case's loops unroll into registers. */
#define ROWS_CASE(n)                                                                                   \
    case n:                                                                                            \
        panel_rows(x, x_stride, panel, out, out_stride, pairs, n, mask_lo, mask_hi);                   \
        break;

static void panel_chunk(const float *x, int64_t x_stride, const uint16_t *panel, uint16_t *out,
                        int64_t out_stride, int64_t pairs, int rows, __mmask16 mask_lo, __mmask16 mask_hi) {
    switch (rows) {
        ROWS_CASE(1)
        ROWS_CASE(2)
        ROWS_CASE(3)
        ROWS_CASE(4)
        ROWS_CASE(5)
        ROWS_CASE(6)
        ROWS_CASE(7)
        ROWS_CASE(8)
        ROWS_CASE(9)
        ROWS_CASE(10)
    default:
        break;
    }
}

static __mmask16 lane_mask(int64_t valid) {
    if (valid <= 0)
        return 0;
    return valid >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1);
}

/*
 * x: [rows, in] with row stride x_stride (elements); packed: [ceil(out/32), in/2, 32, 2];
 * out: [rows, out_features] with row stride out_stride. in must be even.
 * Returns 0, or -1 where this build has no AVX512-BF16.
 */
int hawker_panel_linear(const float *x, int64_t x_stride, const uint16_t *packed, uint16_t *out,
                            int64_t out_stride, int64_t rows, int64_t in_features, int64_t out_features,
                            int threads) {
    const int64_t pairs = in_features / 2;
    const int64_t panels = (out_features + PANEL - 1) / PANEL;
    /* Rows split into equal chunks of at most ROWS_MAX: a small last chunk (32 rows as
     * 10 + 10 + 10 + 2) has too few accumulators to hide the FMAs' latency. */
    const int64_t chunks = (rows + ROWS_MAX - 1) / ROWS_MAX;
    const int64_t chunk_rows = chunks ? (rows + chunks - 1) / chunks : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = 0; j < panels; ++j) {
        const uint16_t *panel = packed + j * pairs * 2 * PANEL;
        const int64_t first = j * PANEL;
        const __mmask16 mask_lo = lane_mask(out_features - first);
        const __mmask16 mask_hi = lane_mask(out_features - first - 16);
        for (int64_t r = 0; r < rows; r += chunk_rows) {
            const int chunk = (int)(rows - r < chunk_rows ? rows - r : chunk_rows);
            panel_chunk(x + r * x_stride, x_stride, panel, out + r * out_stride + first, out_stride, pairs, chunk,
                        mask_lo, mask_hi);
        }
    }
    return 0;
}

int hawker_panel_linear_built(void) { return 1; }

#else

int hawker_panel_linear(const float *x, int64_t x_stride, const uint16_t *packed, uint16_t *out,
                            int64_t out_stride, int64_t rows, int64_t in_features, int64_t out_features,
                            int threads) {
    (void)x, (void)x_stride, (void)packed, (void)out, (void)out_stride, (void)rows, (void)in_features,
        (void)out_features, (void)threads;
    return -1;
}

int hawker_panel_linear_built(void) { return 0; }

#endif
