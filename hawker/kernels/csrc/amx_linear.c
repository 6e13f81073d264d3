/*
 * y = x @ W^T for bfloat16 x and W by AMX tile multiplies, float32 sums (CPU).
 *
 * W is packed once, as for the panel kernel (hawker/kernels/panel_linear.py):
 * [out / 32][in / 2][32][2]. Sixteen input pairs of a panel's first or last
 * 16 outputs are then one AMX B tile as they lie (rows 128 bytes apart), and
 * 16 rows of x by 32 inputs are an A tile read in place. A work item is a
 * panel of 32 outputs for a block of rows (about BLOCK_BYTES of them); it holds 32 rows
 * by 32 outputs in four float32 tiles over the whole input (two A tiles and
 * two B tiles a step), then rounds them to bfloat16. The items run
 * row-block-major, so a thread's rows stay in its cache while it passes over
 * the panels. The rows' tiles are loaded with the streaming hint
 * (tileloaddt1): a group of 32 rows and a panel take 36 KB each at 576
 * inputs, which L1 (48 KB) cannot hold together, and with plain loads each
 * pushed the other out; hinted, the panel stays in L1 for the block's next
 * groups of rows and only the rows come from L2 (12-13 % faster over a
 * model's projections at 128-2,048 rows, benchmarks/NOTES.md session 18).
 *
 * Why not oneDNN's packed matmul, which runs at 2.4-3.0 TFLOP/s on 2,048
 * rows here: its sums for a row depend on how many rows the call has (it
 * picks its algorithm by that count), so under consistent numerics it may
 * only run on fixed zero-padded tiles, and 64-row tiles and their copies
 * cost it 2-2.5x (benchmarks/NOTES.md, session 15).
 *
 * Numerics: each output is its row's products summed over the inputs in
 * order, 32 at a time by tdpbf16ps into float32, rounded once to bfloat16
 * (round to nearest even). A row's result depends only on that row and W:
 * the same bits whatever the number of rows, their order or the thread.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>

#include "amx_tiles.h"
#include "attention_common.h"
#include "bf16_vectors.h"

enum { PANEL = 32, TILE_ROWS = AMX_TILE_ROWS, PAIRS_PER_STEP = 16 };

/* A block's rows take about this many bytes, so they stay in L2 while the panels pass over them. */
#define BLOCK_BYTES (1024 * 1024)
/* At most this many rows a block: each panel read from memory serves them all (512 measured slower). */
#define MAX_BLOCK_ROWS 256

static __mmask16 lane_mask(int64_t valid) {
    if (valid <= 0) return 0;
    return valid >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1);
}

/* 16 x 16 float32 sums into `rows` output rows of bfloat16 (the first `valid` outputs of each). */
static void store_tile(const float *sums, uint16_t *out, int64_t out_stride, int64_t rows, __mmask16 valid) {
    for (int64_t r = 0; r < rows; ++r)
        _mm256_mask_storeu_epi16(out + r * out_stride, valid, (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(sums + r * 16)));
}

/* One panel for 32 rows of x (row stride x_stride elements; the caller pads a short group): tmm0-3 the sums
 * (rows 0-15 / 16-31 by outputs 0-15 / 16-31), tmm4-5 the rows, tmm6-7 the panel's two halves. */
static void panel_rows32(const uint16_t *x, int64_t x_stride, const uint16_t *panel, int64_t pairs, float sums[4][256]) {
    const int64_t x_bytes = x_stride * 2, panel_bytes = PANEL * 2 * 2; /* a pair row of the panel: 128 bytes */
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t p = 0; p < pairs; p += PAIRS_PER_STEP) {
        const uint16_t *weights = panel + p * PANEL * 2;
        _tile_stream_loadd(4, x + 2 * p, x_bytes);
        _tile_stream_loadd(5, x + TILE_ROWS * x_stride + 2 * p, x_bytes);
        _tile_loadd(6, weights, panel_bytes);
        _tile_loadd(7, weights + 32, panel_bytes);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, sums[0], 64);
    _tile_stored(1, sums[1], 64);
    _tile_stored(2, sums[2], 64);
    _tile_stored(3, sums[3], 64);
}

/* The same for 16 rows (tmm0-1 the sums): a group of up to 16 rows does half the tile multiplies. Each
 * output gets the same sequence of tdpbf16ps over the same inputs as in panel_rows32, so the same bits. */
static void panel_rows16(const uint16_t *x, int64_t x_stride, const uint16_t *panel, int64_t pairs, float sums[4][256]) {
    const int64_t x_bytes = x_stride * 2, panel_bytes = PANEL * 2 * 2;
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t p = 0; p < pairs; p += PAIRS_PER_STEP) {
        const uint16_t *weights = panel + p * PANEL * 2;
        _tile_stream_loadd(4, x + 2 * p, x_bytes);
        _tile_loadd(6, weights, panel_bytes);
        _tile_loadd(7, weights + 32, panel_bytes);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
    }
    _tile_stored(0, sums[0], 64);
    _tile_stored(1, sums[1], 64);
}

/* Rows per block: a multiple of 32 that fits BLOCK_BYTES, at least 32 and at most MAX_BLOCK_ROWS; then the
 * rows shared evenly between that many blocks (a short last block left one thread idle). */
static int64_t rows_per_block(int64_t rows, int64_t in_features) {
    int64_t block_rows = BLOCK_BYTES / (in_features * 2) / (2 * TILE_ROWS) * (2 * TILE_ROWS);
    block_rows = block_rows < 2 * TILE_ROWS ? 2 * TILE_ROWS : block_rows > MAX_BLOCK_ROWS ? MAX_BLOCK_ROWS : block_rows;
    const int64_t blocks = (rows + block_rows - 1) / block_rows;
    return ((rows + blocks - 1) / blocks + 2 * TILE_ROWS - 1) / (2 * TILE_ROWS) * (2 * TILE_ROWS);
}

/* Up to 32 rows of x from row r (count of them) where the tiles may read 32: in place, or copied once into
 * `padded` (zero rows after the last) for a short group; *stride is set to the rows' stride. */
static const uint16_t *group_rows(const uint16_t *x, int64_t x_stride, int64_t r, int64_t count, int64_t in_features,
                                  uint16_t *padded, int64_t *padded_rows_from, int64_t *stride) {
    *stride = x_stride;
    if (count % TILE_ROWS == 0) return x + r * x_stride;
    if (*padded_rows_from != r) {
        for (int64_t i = 0; i < count; ++i) memcpy(padded + i * in_features, x + (r + i) * x_stride, (size_t)in_features * 2);
        memset(padded + count * in_features, 0, (size_t)((2 * TILE_ROWS - count) * in_features) * 2);
        *padded_rows_from = r;
    }
    *stride = in_features;
    return padded;
}

/* One panel's products for a group of up to 32 rows (fewer than 17: half the tile multiplies). */
static void panel_group(const uint16_t *rows, int64_t stride, int64_t count, const uint16_t *panel, int64_t pairs,
                        float sums[4][256]) {
    if (count <= TILE_ROWS)
        panel_rows16(rows, stride, panel, pairs, sums);
    else
        panel_rows32(rows, stride, panel, pairs, sums);
}

/*
 * x: [rows, in] bfloat16, row stride x_stride (elements); packed: [out / 32 (rounded up), in / 2, 32, 2];
 * out: [rows, out_features] bfloat16, row stride out_stride. in must be a multiple of 32.
 * Returns 0; -1 if this process may not use AMX or scratch memory was short.
 */
int hawker_amx_linear(const uint16_t *x, int64_t x_stride, const uint16_t *packed, uint16_t *out, int64_t out_stride,
                      int64_t rows, int64_t in_features, int64_t out_features, int threads) {
    if (!amx_permitted()) return -1;
    const int64_t pairs = in_features / 2, panels = (out_features + PANEL - 1) / PANEL;
    const int64_t block_rows = rows_per_block(rows, in_features);
    const int64_t blocks = (rows + block_rows - 1) / block_rows;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        /* 32 zero-padded rows for a block's last, short group of rows, copied once per block a thread meets. */
        uint16_t *padded = calloc((size_t)(2 * TILE_ROWS * in_features), sizeof(uint16_t));
        int64_t padded_rows_from = -1; /* the first row of the group now in `padded` */
        float sums[4][256];
        if (padded) amx_configure_tiles();
#pragma omp for schedule(static)
        for (int64_t item = 0; item < blocks * panels; ++item) {
            if (!padded) {
                failed = 1;
                continue;
            }
            const int64_t block = item / panels, j = item % panels;
            const int64_t first_row = block * block_rows;
            const int64_t end_row = first_row + block_rows < rows ? first_row + block_rows : rows;
            const uint16_t *panel = packed + j * pairs * 2 * PANEL;
            const __mmask16 low = lane_mask(out_features - j * PANEL), high = lane_mask(out_features - j * PANEL - 16);
            for (int64_t r = first_row; r < end_row; r += 2 * TILE_ROWS) {
                const int64_t count = end_row - r < 2 * TILE_ROWS ? end_row - r : 2 * TILE_ROWS;
                int64_t stride;
                const uint16_t *source = group_rows(x, x_stride, r, count, in_features, padded, &padded_rows_from, &stride);
                panel_group(source, stride, count, panel, pairs, sums);
                uint16_t *target = out + r * out_stride + j * PANEL;
                const int64_t upper = count < TILE_ROWS ? count : TILE_ROWS, lower = count - upper;
                store_tile(sums[0], target, out_stride, upper, low);
                store_tile(sums[1], target + 16, out_stride, upper, high);
                store_tile(sums[2], target + TILE_ROWS * out_stride, out_stride, lower, low);
                store_tile(sums[3], target + TILE_ROWS * out_stride + 16, out_stride, lower, high);
            }
        }
        if (padded) _tile_release();
        free(padded);
    }
    return failed ? -1 : 0;
}

/* The float32 sums of tile (rows 16h.., outputs 16c..) of a group as bfloat16 values, row i of it. */
static inline __m512 sums_row(float sums[4][256], int64_t i, int c) {
    return round16_bf16(_mm512_loadu_ps(sums[(i / TILE_ROWS) * 2 + c] + (i % TILE_ROWS) * 16));
}

/*
 * SwiGLU's projection and activation in one pass: out = silu(gate) * up where [gate | up] = x @ W^T, W the
 * fused [gate; up] weight packed as for hawker_amx_linear (out_features = 2 * size, size a multiple of 32).
 * A work item is a block of rows and one panel of 32 gate outputs with the matching panel of up outputs:
 * the gate panel's products for the block's groups of rows are rounded to bfloat16 into a thread's buffer,
 * then the up panel's, and each group's silu(gate) * up is written out; the [rows, 2 * size] product never
 * goes to memory. Its bits are hawker_amx_linear's followed by hawker_silu_and_mul's (the same tile
 * multiplies and roundings, bf16_vectors.h's SiLU). out: [rows, size] bfloat16, row stride out_stride.
 * Returns 0; -1 if this process may not use AMX, scratch memory was short, or size is not a multiple of 32.
 */
int hawker_amx_linear_silu_mul(const uint16_t *x, int64_t x_stride, const uint16_t *packed, uint16_t *out,
                               int64_t out_stride, int64_t rows, int64_t in_features, int64_t out_features,
                               int threads) {
    const int64_t size = out_features / 2;
    if (out_features % (2 * PANEL) || !amx_permitted()) return -1;
    const int64_t pairs = in_features / 2, panel_pairs = size / PANEL;
    const int64_t block_rows = rows_per_block(rows, in_features);
    const int64_t blocks = (rows + block_rows - 1) / block_rows;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        uint16_t *padded = calloc((size_t)(2 * TILE_ROWS * in_features), sizeof(uint16_t));
        uint16_t *gates = malloc((size_t)(block_rows * PANEL) * sizeof(uint16_t)); /* a block's gate panel */
        int64_t padded_rows_from = -1;
        float sums[4][256];
        const int ready = padded != NULL && gates != NULL;
        if (ready) amx_configure_tiles();
#pragma omp for schedule(static)
        for (int64_t item = 0; item < blocks * panel_pairs; ++item) {
            if (!ready) {
                failed = 1;
                continue;
            }
            const int64_t block = item / panel_pairs, j = item % panel_pairs;
            const int64_t first_row = block * block_rows;
            const int64_t end_row = first_row + block_rows < rows ? first_row + block_rows : rows;
            const uint16_t *gate_panel = packed + j * pairs * 2 * PANEL;
            const uint16_t *up_panel = packed + (j + panel_pairs) * pairs * 2 * PANEL;
            for (int pass = 0; pass < 2; ++pass)
                for (int64_t r = first_row; r < end_row; r += 2 * TILE_ROWS) {
                    const int64_t count = end_row - r < 2 * TILE_ROWS ? end_row - r : 2 * TILE_ROWS;
                    int64_t stride;
                    const uint16_t *source = group_rows(x, x_stride, r, count, in_features, padded, &padded_rows_from, &stride);
                    panel_group(source, stride, count, pass == 0 ? gate_panel : up_panel, pairs, sums);
                    for (int64_t i = 0; i < count; ++i)
                        for (int c = 0; c < 2; ++c) {
                            uint16_t *gate = gates + (r - first_row + i) * PANEL + c * 16;
                            if (pass == 0)
                                store16_bf16(gate, sums_row(sums, i, c), 0xFFFF);
                            else
                                store16_bf16(out + (r + i) * out_stride + j * PANEL + c * 16,
                                             silu_mul16(load16_bf16(gate, 0xFFFF), sums_row(sums, i, c)), 0xFFFF);
                        }
                }
        }
        if (ready) _tile_release();
        free(padded), free(gates);
    }
    return failed ? -1 : 0;
}

int hawker_amx_linear_built(void) { return amx_permitted(); }

#else

int hawker_amx_linear(const uint16_t *x, int64_t x_stride, const uint16_t *packed, uint16_t *out, int64_t out_stride,
                      int64_t rows, int64_t in_features, int64_t out_features, int threads) {
    (void)x, (void)x_stride, (void)packed, (void)out, (void)out_stride, (void)rows, (void)in_features,
        (void)out_features, (void)threads;
    return -1;
}

int hawker_amx_linear_silu_mul(const uint16_t *x, int64_t x_stride, const uint16_t *packed, uint16_t *out,
                               int64_t out_stride, int64_t rows, int64_t in_features, int64_t out_features,
                               int threads) {
    (void)x, (void)x_stride, (void)packed, (void)out, (void)out_stride, (void)rows, (void)in_features,
        (void)out_features, (void)threads;
    return -1;
}

int hawker_amx_linear_built(void) { return 0; }

#endif
