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
#include <omp.h>

#include "amx_tiles.h"
#include "attention_common.h"
#include "bf16_vectors.h"

enum { PANEL = 32, TILE_ROWS = AMX_TILE_ROWS, PAIRS_PER_STEP = 16 };
/* A 4-bit step: a panel's 32 outputs by 32 inputs (one Q4_1 group each). Codes first, [16 pairs][32 outputs],
 * a byte the code of the pair's first input in its low nibble and the second's in its high one; then the 32
 * outputs' scales and then their offsets, float16. An output's value is scale * code + offset. */
enum { Q4_CODE_BYTES = PAIRS_PER_STEP * PANEL, Q4_STEP_BYTES = Q4_CODE_BYTES + 2 * PANEL * 2, Q4_AHEAD = 4 };

/* A block's rows take about this many bytes, so they stay in L2 while the panels pass over them. */
#define BLOCK_BYTES (1024 * 1024)
/* At most this many rows a block: each panel read from memory serves them all (512 measured slower). */
#define MAX_BLOCK_ROWS 256
/* Over 4-bit panels, one block while the rows take at most this many bytes (L2), then blocks over the whole
 * weight dequantised once: 1,024 rows of a model's projections 101 against 106 ms at 1 MB, 2,048 rows 205 against
 * 300 at 4 MB (benchmarks/NOTES.md, session 20). */
#ifndef Q4_BLOCK_BYTES
#define Q4_BLOCK_BYTES (2 * 1024 * 1024)
#endif

static __mmask16 lane_mask(int64_t valid) {
    if (valid <= 0) return 0;
    return valid >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1);
}

/* One 4-bit step into the bfloat16 panel's 16 pair rows from `pairs` (a pair row: 32 outputs x 2 inputs).
 * scale * code is exact in float32 (a float16 scale's 11 significant bits times 4), so scale * code + offset
 * is rounded once whether fused or not, as the checkpoint's dequantisation (hawker/loader/gguf.py) rounds it,
 * then once to bfloat16 (nearest even): the values the model's bfloat16 weight holds
 * (hawker/layers/quant.py's exact_float16_int4_grid checks a weight before it is packed so). */
static void dequantize_step(const uint8_t *step, uint16_t *pairs) {
    const __m512i low_nibble = _mm512_set1_epi32(0x0F);
    /* cvtne2ps puts a pair's 16 first inputs in lanes 0-15 and its 16 second ones in 16-31; VNNI wants them
     * interleaved, output by output. */
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const uint16_t *scales = (const uint16_t *)(step + Q4_CODE_BYTES), *offsets = scales + PANEL;
    /* The codes come from memory once a step: requested Q4_AHEAD steps ahead (the hardware's streams alone
     * left the loop waiting on them: 32 rows 9.2 against 7.9 ms over a model's projections). A request
     * past the weight's end is harmless (a prefetch never faults). */
    for (int line = 0; line < Q4_STEP_BYTES; line += 64)
        _mm_prefetch((const char *)step + Q4_AHEAD * Q4_STEP_BYTES + line, _MM_HINT_T0);
    for (int half = 0; half < 2; ++half) {
        const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + 16 * half)));
        const __m512 offset = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(offsets + 16 * half)));
        for (int p = 0; p < PAIRS_PER_STEP; ++p) {
            const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(step + p * PANEL + 16 * half)));
            const __m512 first = _mm512_cvtepi32_ps(_mm512_and_si512(codes, low_nibble));
            const __m512 second = _mm512_cvtepi32_ps(_mm512_srli_epi32(codes, 4));
            const __m512 a = _mm512_fmadd_ps(first, scale, offset), b = _mm512_fmadd_ps(second, scale, offset);
            const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(b, a);
            _mm512_storeu_si512(pairs + p * PANEL * 2 + 16 * half * 2, _mm512_permutexvar_epi16(interleave, both));
        }
    }
}

/* The next panel's 4-bit steps, dequantised one per tile step while the tile unit multiplies the current
 * panel (a panel dequantised just before its own multiplies gained nothing over bfloat16 from memory:
 * benchmarks/NOTES.md, session 19). steps NULL: nothing to do. */
typedef struct {
    const uint8_t *steps;
    uint16_t *target;
} Fill;

static inline void fill_step(const Fill *fill, int64_t p) {
    if (fill->steps) dequantize_step(fill->steps + p / PAIRS_PER_STEP * Q4_STEP_BYTES, fill->target + p * PANEL * 2);
}

/* Row i of a group's float32 sums for outputs 16c.. (tile (i / 16, c)). */
static inline __m512 sums_at(float sums[4][256], int64_t i, int c) {
    return _mm512_loadu_ps(sums[(i / TILE_ROWS) * 2 + c] + (i % TILE_ROWS) * 16);
}

/* The same rounded to bfloat16 values (as floats). */
static inline __m512 sums_row(float sums[4][256], int64_t i, int c) { return round16_bf16(sums_at(sums, i, c)); }

/* A group's products not yet written: rounded to bfloat16 into out (gate NULL: a plain product, the first
 * lanes[c] outputs of each half), or for SwiGLU into the block's gate buffer (out NULL: the gate panel's
 * pass) or as silu(gate) * up into out (the up panel's). Written a few rows per tile step of the next group's
 * multiplies, so that the vector units work while the tile unit does; without that the tile unit waited on
 * the SiLU's vector work, a quarter of the fused kernel's time (benchmarks/NOTES.md, session 21). The same
 * values whenever they are written. */
typedef struct {
    float (*sums)[256]; /* the group's sums; NULL: nothing pending */
    int64_t done, count; /* rows written, rows of the group */
    uint16_t *gate;      /* the group's first row in the gate buffer (rows PANEL apart), or NULL */
    uint16_t *out;       /* the group's first output row, or NULL */
    int64_t out_stride;
    __mmask16 lanes[2]; /* a plain product's valid outputs in each half of the panel */
} Pending;

static inline void write_pending(Pending *w, int64_t upto) {
    if (w == NULL || w->sums == NULL) return;
    upto = upto < w->count ? upto : w->count;
    for (int64_t i = w->done; i < upto; ++i)
        for (int c = 0; c < 2; ++c) {
            uint16_t *out = w->out ? w->out + i * w->out_stride + c * 16 : NULL;
            if (w->gate == NULL) {
                store16_bf16(out, sums_at(w->sums, i, c), w->lanes[c]); /* rounds once, as a plain store */
                continue;
            }
            uint16_t *gate = w->gate + i * PANEL + c * 16;
            if (out == NULL)
                store16_bf16(gate, sums_row(w->sums, i, c), 0xFFFF);
            else
                store16_bf16(out, silu_mul16(load16_bf16(gate, 0xFFFF), sums_row(w->sums, i, c)), 0xFFFF);
        }
    w->done = upto > w->done ? upto : w->done;
}

/* Rows of a pending group to write after tile step `step` (of pairs / 16): all of them by the last step. */
static inline int64_t pending_upto(const Pending *w, int64_t step, int64_t pairs) {
    const int64_t steps = pairs / PAIRS_PER_STEP;
    return w == NULL ? 0 : ((step + 1) * w->count + steps - 1) / steps;
}

/* One panel for 32 rows of x (row stride x_stride elements; the caller pads a short group): tmm0-3 the sums
 * (rows 0-15 / 16-31 by outputs 0-15 / 16-31), tmm4-5 the rows, tmm6-7 the panel's two halves. */
static void panel_rows32(const uint16_t *x, int64_t x_stride, const uint16_t *panel, int64_t pairs, float sums[4][256],
                         const Fill *fill, Pending *pending) {
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
        fill_step(fill, p);
        write_pending(pending, pending_upto(pending, p / PAIRS_PER_STEP, pairs));
    }
    _tile_stored(0, sums[0], 64);
    _tile_stored(1, sums[1], 64);
    _tile_stored(2, sums[2], 64);
    _tile_stored(3, sums[3], 64);
}

/* The same for 16 rows (tmm0-1 the sums): a group of up to 16 rows does half the tile multiplies. Each
 * output gets the same sequence of tdpbf16ps over the same inputs as in panel_rows32, so the same bits. */
static void panel_rows16(const uint16_t *x, int64_t x_stride, const uint16_t *panel, int64_t pairs, float sums[4][256],
                         const Fill *fill, Pending *pending) {
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
        fill_step(fill, p);
        write_pending(pending, pending_upto(pending, p / PAIRS_PER_STEP, pairs));
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

/* Rows per block over bfloat16 panels (rows_per_block) or 4-bit ones: all the rows while they fit
 * Q4_BLOCK_BYTES (each panel is then dequantised once, beside the tile multiplies of the panel before it). */
static int64_t block_rows_for(int64_t rows, int64_t in_features, const uint8_t *q4) {
    return q4 != NULL && rows * in_features * 2 <= Q4_BLOCK_BYTES ? rows : rows_per_block(rows, in_features);
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

/* One panel's products for a group of up to 32 rows (fewer than 17: half the tile multiplies); a pending
 * group's rows (or NULL) are written beside its tile multiplies, all of them by its end. */
static void panel_group(const uint16_t *rows, int64_t stride, int64_t count, const uint16_t *panel, int64_t pairs,
                        float sums[4][256], const Fill *fill, Pending *pending) {
    if (count <= TILE_ROWS)
        panel_rows16(rows, stride, panel, pairs, sums, fill, pending);
    else
        panel_rows32(rows, stride, panel, pairs, sums, fill, pending);
}

/* Where a thread's panels come from: the packed bfloat16 panels as they lie, or 4-bit steps dequantised into
 * one of two buffers, the current panel's and the next one's (filled while the current one multiplies). */
typedef struct {
    const uint16_t *bf16; /* [panels][pairs][32][2], or NULL */
    const uint8_t *q4;    /* [panels][pairs / 16][Q4_STEP_BYTES] when bf16 is NULL */
    int64_t pairs;
    uint16_t *buffers[2];
    int64_t held[2]; /* the panel each buffer holds; -1: none */
    int current;     /* the buffer of the panel last returned */
} Panels;

/* 0 when a 4-bit source could not get its buffers. */
static int panels_open(Panels *w, const uint16_t *bf16, const uint8_t *q4, int64_t pairs) {
    *w = (Panels){.bf16 = bf16, .q4 = q4, .pairs = pairs, .held = {-1, -1}};
    if (bf16) return 1;
    const size_t bytes = (size_t)(pairs * PANEL * 2) * sizeof(uint16_t);
    w->buffers[0] = aligned_alloc(64, bytes), w->buffers[1] = aligned_alloc(64, bytes);
    return w->buffers[0] != NULL && w->buffers[1] != NULL;
}

static void panels_close(Panels *w) { free(w->buffers[0]), free(w->buffers[1]); }

static const uint8_t *q4_steps(const Panels *w, int64_t j) {
    return w->q4 + j * (w->pairs / PAIRS_PER_STEP) * Q4_STEP_BYTES;
}

/* Panel j as bfloat16: in place, or the buffer that holds it, dequantised now if no fill got it ready. */
static const uint16_t *panel_at(Panels *w, int64_t j) {
    if (w->bf16) return w->bf16 + j * w->pairs * 2 * PANEL;
    if (w->held[w->current] != j) {
        w->current = 1 - w->current;
        if (w->held[w->current] != j) {
            for (int64_t p = 0; p < w->pairs; p += PAIRS_PER_STEP)
                dequantize_step(q4_steps(w, j) + p / PAIRS_PER_STEP * Q4_STEP_BYTES, w->buffers[w->current] + p * PANEL * 2);
            w->held[w->current] = j;
        }
    }
    return w->buffers[w->current];
}

/* The fill that dequantises panel `next` (-1: none) into the spare buffer during the current panel's first
 * group of rows; nothing to fill for bfloat16 panels or a panel already held. */
static Fill fill_for(Panels *w, int64_t next) {
    Fill fill = {NULL, NULL};
    if (w->bf16 || next < 0 || w->held[0] == next || w->held[1] == next) return fill;
    const int spare = 1 - w->current;
    w->held[spare] = next;
    fill.steps = q4_steps(w, next), fill.target = w->buffers[spare];
    return fill;
}

/* The whole 4-bit weight as hawker_amx_linear's bfloat16 panels (NULL where memory was short): for steps of
 * more than one block of rows, where each block would dequantise every panel again. */
static uint16_t *dequantized_weight(const uint8_t *q4, int64_t panels, int64_t pairs, int threads) {
    const int64_t steps = pairs / PAIRS_PER_STEP;
    uint16_t *weight = aligned_alloc(64, (size_t)(panels * pairs * PANEL * 2) * sizeof(uint16_t));
    if (weight == NULL) return NULL;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < panels * steps; ++i) dequantize_step(q4 + i * Q4_STEP_BYTES, weight + i * PAIRS_PER_STEP * PANEL * 2);
    return weight;
}

/* A thread's share of `items` work items: a contiguous range (each knows its next panel). */
static void thread_items(int64_t items, int64_t *begin, int64_t *end) {
    const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
    *begin = items * me / team, *end = items * (me + 1) / team;
}

/* hawker_amx_linear over bfloat16 panels (bf16) or 4-bit ones (q4); the same tile multiplies either way. */
static int linear(const uint16_t *x, int64_t x_stride, const uint16_t *bf16, const uint8_t *q4, uint16_t *out,
                  int64_t out_stride, int64_t rows, int64_t in_features, int64_t out_features, int threads) {
    if (!amx_permitted()) return -1;
    const int64_t pairs = in_features / 2, panels = (out_features + PANEL - 1) / PANEL;
    const int64_t block_rows = block_rows_for(rows, in_features, q4);
    const int64_t blocks = (rows + block_rows - 1) / block_rows;
    if (q4 != NULL && blocks > 1) {
        uint16_t *weight = dequantized_weight(q4, panels, pairs, threads);
        const int status = weight ? linear(x, x_stride, weight, NULL, out, out_stride, rows, in_features, out_features, threads) : -1;
        free(weight);
        return status;
    }
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        /* 32 zero-padded rows for a block's last, short group of rows, copied once per block a thread meets. */
        uint16_t *padded = calloc((size_t)(2 * TILE_ROWS * in_features), sizeof(uint16_t));
        int64_t padded_rows_from = -1; /* the first row of the group now in `padded` */
        float sums[2][4][256]; /* a group's tiles, and the group before it while that one is written out */
        int current = 0;
        Pending pending = {0};
        Panels source;
        const int ready = panels_open(&source, bf16, q4, pairs) && padded != NULL;
        int64_t begin, end;
        thread_items(blocks * panels, &begin, &end);
        if (ready) amx_configure_tiles();
        for (int64_t item = begin; item < end && ready; ++item) {
            const int64_t block = item / panels, j = item % panels;
            const int64_t first_row = block * block_rows;
            const int64_t end_row = first_row + block_rows < rows ? first_row + block_rows : rows;
            const uint16_t *panel = panel_at(&source, j);
            const Fill fill = fill_for(&source, item + 1 < end ? (item + 1) % panels : -1), none = {NULL, NULL};
            const __mmask16 low = lane_mask(out_features - j * PANEL), high = lane_mask(out_features - j * PANEL - 16);
            for (int64_t r = first_row; r < end_row; r += 2 * TILE_ROWS) {
                const int64_t count = end_row - r < 2 * TILE_ROWS ? end_row - r : 2 * TILE_ROWS;
                int64_t stride;
                const uint16_t *group = group_rows(x, x_stride, r, count, in_features, padded, &padded_rows_from, &stride);
                panel_group(group, stride, count, panel, pairs, sums[current], r == first_row ? &fill : &none,
                            &pending);
                pending = (Pending){sums[current], 0, count, NULL, out + r * out_stride + j * PANEL, out_stride,
                                    {low, high}};
                current = 1 - current;
            }
        }
        write_pending(&pending, pending.count);
        if (ready) _tile_release();
        failed = !ready;
        free(padded);
        panels_close(&source);
    }
    return failed ? -1 : 0;
}

/*
 * x: [rows, in] bfloat16, row stride x_stride (elements); packed: [out / 32 (rounded up), in / 2, 32, 2];
 * out: [rows, out_features] bfloat16, row stride out_stride. in must be a multiple of 32.
 * Returns 0; -1 if this process may not use AMX or scratch memory was short.
 */
int hawker_amx_linear(const uint16_t *x, int64_t x_stride, const uint16_t *packed, uint16_t *out, int64_t out_stride,
                      int64_t rows, int64_t in_features, int64_t out_features, int threads) {
    return linear(x, x_stride, packed, NULL, out, out_stride, rows, in_features, out_features, threads);
}

/*
 * The same product over 4-bit weights: q4 [out / 32 (rounded up)][in / 32][Q4_STEP_BYTES] (a weight on
 * Q4_1's grid, hawker/kernels/amx_linear.py's pack_q4). Each panel is dequantised into a bfloat16 panel equal
 * to hawker_amx_linear's, so the same bits; a third of the bytes to read from memory.
 */
int hawker_amx_q4_linear(const uint16_t *x, int64_t x_stride, const uint8_t *q4, uint16_t *out, int64_t out_stride,
                         int64_t rows, int64_t in_features, int64_t out_features, int threads) {
    return linear(x, x_stride, NULL, q4, out, out_stride, rows, in_features, out_features, threads);
}

/* hawker_amx_linear_silu_mul over bfloat16 panels (bf16) or 4-bit ones (q4). */
static int silu_mul(const uint16_t *x, int64_t x_stride, const uint16_t *bf16, const uint8_t *q4, uint16_t *out,
                    int64_t out_stride, int64_t rows, int64_t in_features, int64_t out_features, int threads) {
    const int64_t size = out_features / 2;
    if (out_features % (2 * PANEL) || !amx_permitted()) return -1;
    const int64_t pairs = in_features / 2, panel_pairs = size / PANEL;
    const int64_t block_rows = block_rows_for(rows, in_features, q4);
    const int64_t blocks = (rows + block_rows - 1) / block_rows;
    if (q4 != NULL && blocks > 1) {
        uint16_t *weight = dequantized_weight(q4, 2 * panel_pairs, pairs, threads);
        const int status = weight ? silu_mul(x, x_stride, weight, NULL, out, out_stride, rows, in_features, out_features, threads) : -1;
        free(weight);
        return status;
    }
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        uint16_t *padded = calloc((size_t)(2 * TILE_ROWS * in_features), sizeof(uint16_t));
        uint16_t *gates = malloc((size_t)(block_rows * PANEL) * sizeof(uint16_t)); /* a block's gate panel */
        int64_t padded_rows_from = -1;
        float sums[2][4][256]; /* a group's tiles, and the group before it while that one is written out */
        int current = 0;
        Pending pending = {0};
        Panels source;
        const int ready = panels_open(&source, bf16, q4, pairs) && padded != NULL && gates != NULL;
        int64_t begin, end;
        thread_items(blocks * panel_pairs, &begin, &end);
        if (ready) amx_configure_tiles();
        for (int64_t item = begin; item < end && ready; ++item) {
            const int64_t block = item / panel_pairs, j = item % panel_pairs;
            const int64_t first_row = block * block_rows;
            const int64_t end_row = first_row + block_rows < rows ? first_row + block_rows : rows;
            /* The gate panel j, then the up panel j + panel_pairs, then the next item's gate panel. */
            const int64_t order[3] = {j, j + panel_pairs, item + 1 < end ? (item + 1) % panel_pairs : -1};
            for (int pass = 0; pass < 2; ++pass) {
                const uint16_t *panel = panel_at(&source, order[pass]);
                const Fill fill = fill_for(&source, order[pass + 1]), none = {NULL, NULL};
                for (int64_t r = first_row; r < end_row; r += 2 * TILE_ROWS) {
                    const int64_t count = end_row - r < 2 * TILE_ROWS ? end_row - r : 2 * TILE_ROWS;
                    int64_t stride;
                    const uint16_t *group = group_rows(x, x_stride, r, count, in_features, padded, &padded_rows_from, &stride);
                    panel_group(group, stride, count, panel, pairs, sums[current], r == first_row ? &fill : &none,
                                &pending);
                    /* Pending rows are written in order, each before the next pending group (even across
                     * passes and items), so a gate row is written before its up pass reads it and read
                     * before the next item's gate pass writes over it. */
                    pending = (Pending){sums[current], 0, count, gates + (r - first_row) * PANEL,
                                        pass == 0 ? NULL : out + r * out_stride + j * PANEL, out_stride};
                    current = 1 - current;
                }
            }
        }
        write_pending(&pending, pending.count);
        if (ready) _tile_release();
        failed = !ready;
        free(padded), free(gates);
        panels_close(&source);
    }
    return failed ? -1 : 0;
}

/*
 * SwiGLU's projection and activation in one pass: out = silu(gate) * up where [gate | up] = x @ W^T, W the
 * fused [gate; up] weight packed as for hawker_amx_linear (out_features = 2 * size, size a multiple of 32).
 * A work item is a block of rows and one panel of 32 gate outputs with the matching panel of up outputs:
 * the gate panel's products for the block's groups of rows are rounded to bfloat16 into a thread's buffer,
 * then the up panel's, and each group's silu(gate) * up is written out (both beside the next group's tile
 * multiplies: Pending); the [rows, 2 * size] product never goes to memory. Its bits are hawker_amx_linear's
 * followed by hawker_silu_and_mul's (the same tile multiplies and roundings, bf16_vectors.h's SiLU). out: [rows, size] bfloat16, row stride out_stride.
 * Returns 0; -1 if this process may not use AMX, scratch memory was short, or size is not a multiple of 32.
 */
int hawker_amx_linear_silu_mul(const uint16_t *x, int64_t x_stride, const uint16_t *packed, uint16_t *out,
                               int64_t out_stride, int64_t rows, int64_t in_features, int64_t out_features,
                               int threads) {
    return silu_mul(x, x_stride, packed, NULL, out, out_stride, rows, in_features, out_features, threads);
}

/* The same over 4-bit weights packed as for hawker_amx_q4_linear: the same bits. */
int hawker_amx_q4_linear_silu_mul(const uint16_t *x, int64_t x_stride, const uint8_t *q4, uint16_t *out,
                                  int64_t out_stride, int64_t rows, int64_t in_features, int64_t out_features,
                                  int threads) {
    return silu_mul(x, x_stride, NULL, q4, out, out_stride, rows, in_features, out_features, threads);
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

int hawker_amx_q4_linear(const uint16_t *x, int64_t x_stride, const uint8_t *q4, uint16_t *out, int64_t out_stride,
                         int64_t rows, int64_t in_features, int64_t out_features, int threads) {
    (void)x, (void)x_stride, (void)q4, (void)out, (void)out_stride, (void)rows, (void)in_features, (void)out_features,
        (void)threads;
    return -1;
}

int hawker_amx_q4_linear_silu_mul(const uint16_t *x, int64_t x_stride, const uint8_t *q4, uint16_t *out,
                                  int64_t out_stride, int64_t rows, int64_t in_features, int64_t out_features,
                                  int threads) {
    (void)x, (void)x_stride, (void)q4, (void)out, (void)out_stride, (void)rows, (void)in_features, (void)out_features,
        (void)threads;
    return -1;
}

int hawker_amx_linear_built(void) { return 0; }

#endif
