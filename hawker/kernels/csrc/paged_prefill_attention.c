/*
 * Causal attention of prompt chunks over the paged KV cache, read in place (CPU).
 *
 * A chunk is a run of query tokens of one sequence at positions start ..
 * start + len - 1; its keys and values (the cached prefix and the chunk's own,
 * written before this call) are read through the sequence's block table.
 First every (chunk, KV head)'s keys and values are packed, once, into the
 * layout the dot products stream through (16 keys to a vector); then work
 * items, a tile of TILE_QUERIES queries of a chunk with the query heads that
 * share a KV head, compute every score (pass 1), the softmax (pass 2) and the
 * weighted sum of values (pass 3). A cache of 8-bit floats (kv_cache_dtype) is
 * widened exactly as it is packed.
 *
 * Numerics: every query row is computed on its own, in an order that depends
 * only on its position: keys in blocks of 16 from position 0, the softmax over
 * exactly its keys, later keys of its tile contributing exact zeros, float32
 * sums. So a query gets the same bits whatever chunk or tile it is in: a
 * prompt attends alike cold and after a prefix-cache hit. Where the CPU has
 * AVX512-BF16, bfloat16 products are vdpbf16ps pairs summed in float32, the
 * probabilities rounded to bfloat16 for the product with the values (as flash
 * attention does on a GPU); elsewhere everything is widened to float32. Where
 * the CPU also has AMX (and the caller asks for it), the same products run as
 * tile multiplies of 16 rows: a tile's row depends on its own query row alone
 * and its sums run over dims and keys in a fixed order, so it keeps the
 * property above (its bits differ from the vdpbf16ps path's, not between
 * chunks). For 64-dim heads the AMX path runs the three passes in one sweep
 * over the keys, 32 at a time, with a running largest score per row (flash
 * attention's order, attend_amx_64), so scores and weights stay in L1.
 *
 * Built at run time by hawker/kernels/native.py (-O3 -march=native -fopenmp).
 */
#include "attention_common.h"

#define KEYS 16         /* keys per block: one vector of float32 scores */
#define TILE_QUERIES 16 /* query positions per tile */
#define MAX_ROWS 4 /* query rows whose dot products share each loaded key vector */

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define HAVE_BF16_PAIRS 1
#else
#define HAVE_BF16_PAIRS 0
#endif

#if HAVE_BF16_PAIRS && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define HAVE_AMX 1
#include "amx_tiles.h"
#else
#define HAVE_AMX 0
#endif

/* Packed keys of a (chunk, KV head) reach a multiple of KEY_SPAN positions: a
 * tile multiply of the values takes 16 key pairs at a time. */
#define KEY_SPAN 32

typedef struct {
    const char *q;
    const char *k_cache;
    const char *v_cache;
    char *out;
    const int64_t *block_tables; /* [chunks, table_stride] */
    const int64_t *chunk_rows;   /* first row of each chunk in q and out */
    const int64_t *chunk_lens;
    const int64_t *chunk_starts; /* position of each chunk's first query */
    int64_t table_stride;
    int64_t q_row_stride; /* elements between consecutive tokens' queries */
    int64_t num_heads;
    int64_t num_kv_heads;
    int64_t head_dim;
    int64_t block_size;
    float scale;
    int dtype;       /* of the queries and the output */
    int cache_dtype; /* of the keys and values: the queries' or an 8-bit float */
    int pairs;       /* the bfloat16-pairs path (else float32) */
    int amx;         /* that path's products as AMX tile multiplies */
} PrefillArgs;

typedef struct {
    int64_t chunk, kv_head, tile;
} Item;

/* One (chunk, KV head)'s keys and values, packed: every position up to a multiple of KEYS. */
typedef struct {
    void *keys;   /* [blocks][dim / 2][KEYS] bfloat16 pairs, or [blocks][dim][KEYS] floats */
    void *values; /* [keys / 2][dim] bfloat16 pairs, or [keys][dim] floats */
} Packed;

/* One thread's scratch, sized for the longest context and a full tile. */
typedef struct {
    void *queries;   /* [rows][dim] in the dtype (pairs) or floats */
    float *scores;   /* [rows][padded keys]: scores, then unnormalised probabilities */
    uint16_t *probs; /* [rows][padded keys]: those in bfloat16 (pairs path) */
    float *outs;     /* [rows][dim] */
    float *sums;     /* [rows] */
} Scratch;

static inline int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

/* The cache row of `position` of this chunk's sequence, for `kv_head`. */
static inline const char *cache_row(const PrefillArgs *a, const char *cache, const int64_t *table, int64_t kv_head,
                                    int64_t position) {
    const size_t elem = element_size(a->cache_dtype);
    const int64_t block = table[position / a->block_size], offset = position % a->block_size;
    return cache + (size_t)(((block * a->block_size + offset) * a->num_kv_heads + kv_head) * a->head_dim) * elem;
}

/* That row as bfloat16: in place for a bfloat16 cache, else widened into `wide` (exact for 8-bit floats);
 * NULL past `count` positions. */
static inline const uint16_t *cache_row_bf16(const PrefillArgs *a, const char *cache, const int64_t *table,
                                             int64_t kv_head, int64_t position, int64_t count, uint16_t *wide) {
    if (position >= count) return NULL;
    const char *row = cache_row(a, cache, table, kv_head, position);
    if (a->cache_dtype == DTYPE_BFLOAT16) return (const uint16_t *)row;
    load_row_bf16(row, a->cache_dtype, a->head_dim, wide);
    return wide;
}

/* ---------------------------------------------------------------- packing */

/* Keys and values of positions [first, first + KEYS) (those from `count` on are zero) into `packed`. */
static void pack_block(const PrefillArgs *a, const Packed *packed, const int64_t *table, int64_t kv_head, int64_t first,
                       int64_t count) {
    const int64_t dim = a->head_dim;
    if (a->pairs) {
        uint32_t *keys = (uint32_t *)packed->keys + first * (dim / 2);
        uint32_t *values = (uint32_t *)packed->values + first / 2 * dim;
        uint16_t wide[4][dim];
        for (int64_t j = 0; j < KEYS; j += 2) {
            const int64_t t = first + j;
            const uint16_t *k0 = cache_row_bf16(a, a->k_cache, table, kv_head, t, count, wide[0]);
            const uint16_t *k1 = cache_row_bf16(a, a->k_cache, table, kv_head, t + 1, count, wide[1]);
            const uint16_t *v0 = cache_row_bf16(a, a->v_cache, table, kv_head, t, count, wide[2]);
            const uint16_t *v1 = cache_row_bf16(a, a->v_cache, table, kv_head, t + 1, count, wide[3]);
            for (int64_t p = 0; p < dim / 2; ++p) {
                keys[p * KEYS + j] = k0 ? (uint32_t)k0[2 * p] | (uint32_t)k0[2 * p + 1] << 16 : 0;
                keys[p * KEYS + j + 1] = k1 ? (uint32_t)k1[2 * p] | (uint32_t)k1[2 * p + 1] << 16 : 0;
            }
            for (int64_t d = 0; d < dim; ++d)
                values[j / 2 * dim + d] = (uint32_t)(v0 ? v0[d] : 0) | (uint32_t)(v1 ? v1[d] : 0) << 16;
        }
        return;
    }
    float *keys = (float *)packed->keys + first * dim, *values = (float *)packed->values + first * dim;
    float row[dim];
    for (int64_t j = 0; j < KEYS; ++j) {
        const int64_t t = first + j;
        if (t < count) {
            load_row(cache_row(a, a->k_cache, table, kv_head, t), a->cache_dtype, dim, row);
            load_row(cache_row(a, a->v_cache, table, kv_head, t), a->cache_dtype, dim, values + j * dim);
        } else {
            memset(row, 0, sizeof row);
            memset(values + j * dim, 0, sizeof row);
        }
        for (int64_t d = 0; d < dim; ++d) keys[d * KEYS + j] = row[d];
    }
}

/* ------------------------------------------------------- pass 1: scores */

#if HAVE_BF16_PAIRS
/* scores[r][...] for ROWS query rows (pairs of bfloat16 dims) against every packed key block. */
static inline __attribute__((always_inline)) void scores_pairs(const Packed *packed, int64_t blocks, int64_t dim,
                                                               const uint32_t *const *queries, float *const *scores,
                                                               float scale, const int ROWS) {
    const __m512 factor = _mm512_set1_ps(scale);
    for (int64_t b = 0; b < blocks; ++b) {
        const uint32_t *keys = (const uint32_t *)packed->keys + b * (dim / 2) * KEYS;
        __m512 acc[MAX_ROWS];
        for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
        for (int64_t p = 0; p < dim / 2; ++p) {
            const __m512bh key = (__m512bh)_mm512_loadu_si512(keys + p * KEYS);
            for (int r = 0; r < ROWS; ++r)
                acc[r] = _mm512_dpbf16_ps(acc[r], key, (__m512bh)_mm512_set1_epi32((int)queries[r][p]));
        }
        for (int r = 0; r < ROWS; ++r) _mm512_storeu_ps(scores[r] + b * KEYS, _mm512_mul_ps(acc[r], factor));
    }
}
#endif

static inline __attribute__((always_inline)) void scores_floats(const Packed *packed, int64_t blocks, int64_t dim,
                                                                const float *const *queries, float *const *scores,
                                                                float scale, const int ROWS) {
    for (int64_t b = 0; b < blocks; ++b) {
        const float *keys = (const float *)packed->keys + b * dim * KEYS;
        float acc[MAX_ROWS][KEYS] = {{0}};
        for (int64_t d = 0; d < dim; ++d)
            for (int r = 0; r < ROWS; ++r) {
                const float query = queries[r][d];
#pragma omp simd
                for (int j = 0; j < KEYS; ++j) acc[r][j] += query * keys[d * KEYS + j];
            }
        for (int r = 0; r < ROWS; ++r)
            for (int j = 0; j < KEYS; ++j) scores[r][b * KEYS + j] = acc[r][j] * scale;
    }
}

/* ------------------------------------------------------ pass 2: softmax */

/* `count` (a multiple of 16) float32 values rounded to bfloat16 (to nearest even, as float_to_bf16). */
static void round_to_bf16(const float *src, uint16_t *dst, int64_t count) {
#if HAVE_BF16_PAIRS
    for (int64_t t = 0; t < count; t += 16)
        _mm256_storeu_si256((__m256i *)(dst + t), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + t)));
#else
    for (int64_t t = 0; t < count; ++t) dst[t] = float_to_bf16(src[t]);
#endif
}

/* ----------------------------------------------- pass 3: weighted values */

#if HAVE_BF16_PAIRS
/* out rows = sum over key pairs of (p, p') . (v, v'), CHUNKS x 16 dims, ROWS rows, accumulators in registers. */
static inline __attribute__((always_inline)) void values_pairs(const Packed *packed, int64_t padded, int64_t dim,
                                                               const uint32_t *const *probs, float *const *out,
                                                               const int ROWS, const int CHUNKS) {
    __m512 acc[MAX_ROWS][8];
    for (int r = 0; r < ROWS; ++r)
        for (int c = 0; c < CHUNKS; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t pair = 0; pair < padded / 2; ++pair) {
        const uint32_t *values = (const uint32_t *)packed->values + pair * dim;
        __m512bh value[8];
        for (int c = 0; c < CHUNKS; ++c) value[c] = (__m512bh)_mm512_loadu_si512(values + c * 16);
        for (int r = 0; r < ROWS; ++r) {
            const __m512bh weight = (__m512bh)_mm512_set1_epi32((int)probs[r][pair]);
            for (int c = 0; c < CHUNKS; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], value[c], weight);
        }
    }
    for (int r = 0; r < ROWS; ++r)
        for (int c = 0; c < CHUNKS; ++c) _mm512_storeu_ps(out[r] + c * 16, acc[r][c]);
}
#endif

static void values_floats(const Packed *packed, int64_t padded, int64_t dim, const float *probs, float *out) {
    memset(out, 0, (size_t)dim * sizeof(float));
    for (int64_t t = 0; t < padded; ++t) {
        const float weight = probs[t];
        const float *value = (const float *)packed->values + t * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) out[d] += weight * value[d];
    }
}

/* ------------------------------------------------ AMX: both products */

#if HAVE_AMX
#define TILE_ROWS AMX_TILE_ROWS

/* scores[row][key] (rows of `padded` floats, not yet scaled) for `row_tiles` x 16 query rows of bfloat16
 * ([row][dim]) against `padded` / KEYS packed key blocks: tmm0 the scores, tmm1 a block's dims, tmm2.. the
 * queries. */
static void scores_amx(const Packed *packed, const uint16_t *queries, int64_t row_tiles, int64_t padded, int64_t dim,
                       float *scores) {
    const int64_t query_stride = dim * 2, block_words = dim / 2 * KEYS; /* a key block's uint32 pairs */
    for (int64_t tile = 0; tile < row_tiles; ++tile) {
        const uint16_t *rows = queries + tile * TILE_ROWS * dim;
        float *out = scores + tile * TILE_ROWS * padded;
        /* A tile of 16 dim pairs holds 32 dims: two for 64-dim heads, four for 128. */
        _tile_loadd(2, rows, query_stride);
        _tile_loadd(3, rows + 32, query_stride);
        if (dim == 128) {
            _tile_loadd(4, rows + 64, query_stride);
            _tile_loadd(5, rows + 96, query_stride);
        }
        for (int64_t b = 0; b < padded / KEYS; ++b) {
            const uint32_t *keys = (const uint32_t *)packed->keys + b * block_words;
            _tile_zero(0);
            _tile_loadd(1, keys, 64);
            _tile_dpbf16ps(0, 2, 1);
            _tile_loadd(1, keys + 16 * KEYS, 64);
            _tile_dpbf16ps(0, 3, 1);
            if (dim == 128) {
                _tile_loadd(1, keys + 32 * KEYS, 64);
                _tile_dpbf16ps(0, 4, 1);
                _tile_loadd(1, keys + 48 * KEYS, 64);
                _tile_dpbf16ps(0, 5, 1);
            }
            _tile_stored(0, out + b * KEYS, padded * (int64_t)sizeof(float));
        }
    }
}

/* 2^y on 16 lanes for y <= about 0: a degree-3 fit of 2^f on [-0.5, 0.5] (relative error under 7.5e-5, 26
 * times below a bfloat16 weight's rounding; the degree-5 fit's 2.5e-7 cost two more multiply-adds a vector
 * in the vector-bound softmax), 2^n applied by vscalefps (0 far below). */
static inline __m512 exp2_16(__m512 y) {
    const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(y, n);
    __m512 p = _mm512_set1_ps(5.517162e-2f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4261117e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.932610e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.999281e-1f));
    return _mm512_scalef_ps(p, n);
}

/* The unnormalised softmax of scale x one row's scores, its weights written as bfloat16 into `probs` (zeros
 * from `valid` to `padded`, a multiple of 16); returns the float32 sum of the weights. Two passes: the
 * largest and smallest raw scores, of which the one that scaling makes largest (rounding is monotonic) is
 * the top scaled score; then exp(scale s - top) as 2^(s log2(e) scale - top log2(e)), one fused
 * multiply-add and exp2_16 a vector. A function of the row's own scores alone, so a query's weights are the
 * same in any chunk or tile. */
static float softmax_row_bf16(const float *scores, float scale, int64_t valid, int64_t padded, uint16_t *probs) {
    __m512 high = _mm512_set1_ps(-INFINITY), low = _mm512_set1_ps(INFINITY);
    for (int64_t t = 0; t < valid; t += 16) {
        const __mmask16 mask = lanes_below(valid - t);
        const __m512 row = _mm512_loadu_ps(scores + t);
        high = _mm512_mask_max_ps(high, mask, high, row);
        low = _mm512_mask_min_ps(low, mask, low, row);
    }
    const float top = scale > 0.0f ? _mm512_reduce_max_ps(high) : _mm512_reduce_min_ps(low);
    const float factor = scale * 1.44269504088896341f;
    const __m512 multiplier = _mm512_set1_ps(factor), shift = _mm512_set1_ps(top * factor);
    __m512 total = _mm512_setzero_ps();
    int64_t t = 0;
    for (; t < valid; t += 16) {
        const __m512 exponent = _mm512_fmsub_ps(_mm512_loadu_ps(scores + t), multiplier, shift);
        const __m512 weights = _mm512_maskz_mov_ps(lanes_below(valid - t), exp2_16(exponent));
        _mm256_storeu_si256((__m256i *)(probs + t), (__m256i)_mm512_cvtneps_pbh(weights));
        total = _mm512_add_ps(total, weights);
    }
    for (; t < padded; t += 16) _mm256_storeu_si256((__m256i *)(probs + t), _mm256_setzero_si256());
    return _mm512_reduce_add_ps(total);
}

/* outs[row][dim] = probs[row][key] (bfloat16, rows of `padded`, a multiple of KEY_SPAN) times the packed
 * values, 64 dims at a time: tmm0-3 the sums, tmm4 16 key pairs of probabilities, tmm5-7 the values. */
static void values_amx(const Packed *packed, const uint16_t *probs, int64_t row_tiles, int64_t padded, int64_t dim,
                       float *outs) {
    const int64_t value_stride = dim * 4, out_stride = dim * (int64_t)sizeof(float);
    for (int64_t tile = 0; tile < row_tiles; ++tile)
        for (int64_t first_dim = 0; first_dim < dim; first_dim += 64) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t pair = 0; pair < padded / 2; pair += 16) {
                const uint32_t *values = (const uint32_t *)packed->values + pair * dim + first_dim;
                _tile_loadd(4, probs + tile * TILE_ROWS * padded + 2 * pair, padded * 2);
                _tile_loadd(5, values, value_stride);
                _tile_dpbf16ps(0, 4, 5);
                _tile_loadd(6, values + 16, value_stride);
                _tile_dpbf16ps(1, 4, 6);
                _tile_loadd(7, values + 32, value_stride);
                _tile_dpbf16ps(2, 4, 7);
                _tile_loadd(5, values + 48, value_stride);
                _tile_dpbf16ps(3, 4, 5);
            }
            float *out = outs + tile * TILE_ROWS * dim + first_dim;
            _tile_stored(0, out, out_stride);
            _tile_stored(1, out + 16, out_stride);
            _tile_stored(2, out + 32, out_stride);
            _tile_stored(3, out + 48, out_stride);
        }
}

/* ------------------------------------- AMX, 64-dim heads: one sweep a pass */

/* Keys a fused step takes: two key blocks of scores, one tile multiply of the values. */
#define FUSED_KEYS KEY_SPAN

/* Raw scores of 16 query rows (tmm5-6) against keys [first, first + FUSED_KEYS) into scores[16][FUSED_KEYS]
 * (the same tile multiplies, in the same order, as scores_amx: the same bits). */
static inline __attribute__((always_inline)) void fused_scores(const Packed *packed, int64_t first, float *scores) {
    const int64_t block_words = 32 * KEYS; /* 64 dims: 32 pairs of 16 keys */
    for (int64_t i = 0; i < FUSED_KEYS / KEYS; ++i) {
        const uint32_t *keys = (const uint32_t *)packed->keys + (first / KEYS + i) * block_words;
        _tile_zero(4);
        _tile_loadd(7, keys, 64);
        _tile_dpbf16ps(4, 5, 7);
        _tile_loadd(7, keys + 16 * KEYS, 64);
        _tile_dpbf16ps(4, 6, 7);
        _tile_stored(4, scores + i * KEYS, FUSED_KEYS * (int64_t)sizeof(float));
    }
}

/* The weighted sums of 16 rows by 64 dims (tmm0-3) to and from `out` (rows of 64 floats), exactly. */
static inline __attribute__((always_inline)) void store_sums(float *out) {
    _tile_stored(0, out, 256);
    _tile_stored(1, out + 16, 256);
    _tile_stored(2, out + 32, 256);
    _tile_stored(3, out + 48, 256);
}

static inline __attribute__((always_inline)) void load_sums(const float *out) {
    _tile_loadd(0, out, 256);
    _tile_loadd(1, out + 16, 256);
    _tile_loadd(2, out + 32, 256);
    _tile_loadd(3, out + 48, 256);
}

/* A row's weights are taken against a running largest score that moves only when a weight would pass
 * 2^RESCALE_LOG2, so the weights stay under it and the sums rarely need rescaling. */
#define RESCALE_LOG2 2.0f

/* The first `count` lanes (none for count <= 0). */
static inline __mmask16 lanes_upto(int64_t count) { return count <= 0 ? 0 : lanes_below(count); }

/* The largest of the masked lanes of a and b for a positive scale, the smallest for a negative one. */
static inline float step_top(__m512 a, __m512 b, __mmask16 a_lanes, __mmask16 b_lanes, float scale) {
    const __m512 fill = _mm512_set1_ps(scale > 0.0f ? -INFINITY : INFINITY);
    a = _mm512_mask_mov_ps(fill, a_lanes, a), b = _mm512_mask_mov_ps(fill, b_lanes, b);
    return scale > 0.0f ? _mm512_reduce_max_ps(_mm512_max_ps(a, b)) : _mm512_reduce_min_ps(_mm512_min_ps(a, b));
}

/*
 * The three passes of attend_tile for 64-dim heads in one sweep over the keys, FUSED_KEYS keys a step for 16
 * rows, so that no row's scores or weights leave L1 (flash attention's order). A row's weights are
 * 2^(s log2(e) scale - shift), shift its first step's top score scaled; when a later weight would pass
 * 2^RESCALE_LOG2 the shift moves to that step's top and the row's sum of weights and weighted values so far
 * are multiplied by 2^(old shift - new shift). Every choice depends on the row's own scores in key order
 * alone, so a query gets the same bits in any chunk or tile. Tiles: tmm0-3 the weighted sums (64 dims), tmm4
 * scores then weights, tmm5-6 the queries, tmm7 keys and values.
 */
static void attend_amx_64(const Packed *packed, const uint16_t *queries, int64_t rows, int64_t first_position,
                          int64_t group, int64_t padded, float scale, float *outs, float *sums, float *scores,
                          uint16_t *probs) {
    const float factor = scale * 1.44269504088896341f;
    const __m512 multiplier = _mm512_set1_ps(factor), limit = _mm512_set1_ps(RESCALE_LOG2);
    for (int64_t first_row = 0; first_row < rows; first_row += TILE_ROWS) {
        const int64_t count = rows - first_row < TILE_ROWS ? rows - first_row : TILE_ROWS;
        int64_t valid[TILE_ROWS];
        __m512 totals[TILE_ROWS];
        float shift[TILE_ROWS];
        for (int64_t r = 0; r < count; ++r) {
            valid[r] = first_position + (first_row + r) / group + 1;
            totals[r] = _mm512_setzero_ps();
        }
        float *out = outs + first_row * 64;
        /* Rows past the last are zero weights (their sums unused). */
        memset(probs + count * FUSED_KEYS, 0, (size_t)((TILE_ROWS - count) * FUSED_KEYS) * sizeof(uint16_t));
        _tile_loadd(5, queries + first_row * 64, 128);
        _tile_loadd(6, queries + first_row * 64 + 32, 128);
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        /* The next step's scores are multiplied (scores[] alternates between two halves) before this step's
         * weights are taken, so the tile unit works while the vector units do. */
        fused_scores(packed, 0, scores);
        for (int64_t first = 0; first < padded; first += FUSED_KEYS) {
            float *step_scores = scores + (first / FUSED_KEYS % 2) * TILE_ROWS * FUSED_KEYS;
            if (first + FUSED_KEYS < padded)
                fused_scores(packed, first + FUSED_KEYS, scores + ((first / FUSED_KEYS + 1) % 2) * TILE_ROWS * FUSED_KEYS);
            float rescale[TILE_ROWS];
            int moved = 0;
            for (int64_t r = 0; r < count; ++r) {
                uint16_t *weights_out = probs + r * FUSED_KEYS;
                const int64_t left = valid[r] - first;
                rescale[r] = 1.0f;
                if (left <= 0) {
                    _mm512_storeu_si512(weights_out, _mm512_setzero_si512());
                    continue;
                }
                const __mmask16 low = lanes_upto(left), high = lanes_upto(left - 16);
                const __m512 a = _mm512_loadu_ps(step_scores + r * FUSED_KEYS), b = _mm512_loadu_ps(step_scores + r * FUSED_KEYS + 16);
                if (first == 0) shift[r] = step_top(a, b, low, high, scale) * factor;
                __m512 shifted = _mm512_set1_ps(shift[r]);
                __m512 ea = _mm512_fmsub_ps(a, multiplier, shifted), eb = _mm512_fmsub_ps(b, multiplier, shifted);
                if (_mm512_mask_cmp_ps_mask(low, ea, limit, _CMP_GT_OQ) | _mm512_mask_cmp_ps_mask(high, eb, limit, _CMP_GT_OQ)) {
                    const float moved_shift = step_top(a, b, low, high, scale) * factor;
                    rescale[r] = exp2f(shift[r] - moved_shift);
                    totals[r] = _mm512_mul_ps(totals[r], _mm512_set1_ps(rescale[r]));
                    shift[r] = moved_shift, moved = 1;
                    shifted = _mm512_set1_ps(moved_shift);
                    ea = _mm512_fmsub_ps(a, multiplier, shifted), eb = _mm512_fmsub_ps(b, multiplier, shifted);
                }
                __m512 wa = exp2_16(ea), wb = exp2_16(eb);
                if (left < FUSED_KEYS) /* past the row's last key: zero weights (a step below it needs no masks) */
                    wa = _mm512_maskz_mov_ps(low, wa), wb = _mm512_maskz_mov_ps(high, wb);
                _mm512_storeu_si512(weights_out, (__m512i)_mm512_cvtne2ps_pbh(wb, wa));
                totals[r] = _mm512_add_ps(_mm512_add_ps(totals[r], wa), wb);
            }
            if (moved) { /* the tiles pass through `out` to rescale the rows whose shift moved */
                store_sums(out);
                for (int64_t r = 0; r < count; ++r) {
                    if (rescale[r] == 1.0f) continue;
                    const __m512 by = _mm512_set1_ps(rescale[r]);
                    for (int64_t d = 0; d < 64; d += 16)
                        _mm512_storeu_ps(out + r * 64 + d, _mm512_mul_ps(_mm512_loadu_ps(out + r * 64 + d), by));
                }
                load_sums(out);
            }
            const uint32_t *values = (const uint32_t *)packed->values + first / 2 * 64;
            _tile_loadd(4, probs, FUSED_KEYS * 2);
            _tile_loadd(7, values, 256);
            _tile_dpbf16ps(0, 4, 7);
            _tile_loadd(7, values + 16, 256);
            _tile_dpbf16ps(1, 4, 7);
            _tile_loadd(7, values + 32, 256);
            _tile_dpbf16ps(2, 4, 7);
            _tile_loadd(7, values + 48, 256);
            _tile_dpbf16ps(3, 4, 7);
        }
        store_sums(out);
        for (int64_t r = 0; r < count; ++r) sums[first_row + r] = _mm512_reduce_add_ps(totals[r]);
    }
}
#endif

/* 1 where the kernel was built with AMX and this process may use it. */
int hawker_paged_prefill_attention_amx(void) {
#if HAVE_AMX
    return amx_permitted();
#else
    return 0;
#endif
}

/* ------------------------------------------------------------ one tile */

/* Pass 1 with vector dot products: scores[row][...] of `rows` query rows, MAX_ROWS sharing each key load. */
static void tile_scores_vectors(const PrefillArgs *a, const Scratch *s, const Packed *packed, int64_t rows,
                                int64_t padded) {
    const int64_t dim = a->head_dim;
    const size_t query_bytes = a->pairs ? element_size(a->dtype) : sizeof(float);
    for (int64_t r = 0; r < rows; r += MAX_ROWS) {
        const int count = rows - r < MAX_ROWS ? (int)(rows - r) : MAX_ROWS;
        const void *query_rows[MAX_ROWS];
        float *score_rows[MAX_ROWS];
        for (int i = 0; i < count; ++i) {
            query_rows[i] = (const char *)s->queries + (size_t)((r + i) * dim) * query_bytes;
            score_rows[i] = s->scores + (r + i) * padded;
        }
#if HAVE_BF16_PAIRS
        if (a->pairs) {
            const uint32_t *const *q32 = (const uint32_t *const *)query_rows;
            if (count == MAX_ROWS)
                scores_pairs(packed, padded / KEYS, dim, q32, score_rows, a->scale, MAX_ROWS);
            else
                for (int i = 0; i < count; ++i) scores_pairs(packed, padded / KEYS, dim, q32 + i, score_rows + i, a->scale, 1);
            continue;
        }
#endif
        const float *const *qf = (const float *const *)query_rows;
        if (count == MAX_ROWS)
            scores_floats(packed, padded / KEYS, dim, qf, score_rows, a->scale, MAX_ROWS);
        else
            for (int i = 0; i < count; ++i) scores_floats(packed, padded / KEYS, dim, qf + i, score_rows + i, a->scale, 1);
    }
}

/* Pass 3 with vector dot products: outs[row] of `rows` rows, MAX_ROWS sharing each value load. */
static void tile_values_vectors(const PrefillArgs *a, const Scratch *s, const Packed *packed, int64_t rows,
                                int64_t padded) {
    const int64_t dim = a->head_dim;
    for (int64_t r = 0; r < rows; r += MAX_ROWS) {
        const int count = rows - r < MAX_ROWS ? (int)(rows - r) : MAX_ROWS;
        float *out_rows[MAX_ROWS];
        for (int i = 0; i < count; ++i) out_rows[i] = s->outs + (r + i) * dim;
#if HAVE_BF16_PAIRS
        if (a->pairs) {
            const uint32_t *prob_rows[MAX_ROWS];
            for (int i = 0; i < count; ++i) prob_rows[i] = (const uint32_t *)(s->probs + (r + i) * padded);
            if (dim == 64 && count == MAX_ROWS)
                values_pairs(packed, padded, dim, prob_rows, out_rows, MAX_ROWS, 4);
            else
                for (int i = 0; i < count; ++i) {
                    if (dim == 64)
                        values_pairs(packed, padded, dim, prob_rows + i, out_rows + i, 1, 4);
                    else
                        values_pairs(packed, padded, dim, prob_rows + i, out_rows + i, 1, 8);
                }
            continue;
        }
#endif
        for (int i = 0; i < count; ++i) values_floats(packed, padded, dim, s->scores + (r + i) * padded, out_rows[i]);
    }
}

/* Rows of a tile are (query position, head of the group), position-major. */
static void attend_tile(const PrefillArgs *a, const Scratch *s, const Packed *packed, int64_t chunk, int64_t kv_head,
                        int64_t tile) {
    const int64_t group = a->num_heads / a->num_kv_heads, dim = a->head_dim;
    const int64_t first_query = tile * TILE_QUERIES;
    const int64_t queries = a->chunk_lens[chunk] - first_query < TILE_QUERIES ? a->chunk_lens[chunk] - first_query
                                                                               : TILE_QUERIES;
    const int64_t rows = queries * group;
    const int64_t first_position = a->chunk_starts[chunk] + first_query;
    const int64_t padded = round_up(first_position + queries, a->amx ? KEY_SPAN : KEYS);
    const size_t elem = element_size(a->dtype);
    /* Queries of the tile: in the dtype for the pairs path, widened otherwise. */
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t token = a->chunk_rows[chunk] + first_query + r / group, head = kv_head * group + r % group;
        const char *src = a->q + (size_t)(token * a->q_row_stride + head * dim) * elem;
        if (a->pairs)
            memcpy((char *)s->queries + (size_t)(r * dim) * elem, src, (size_t)dim * elem);
        else
            load_row(src, a->dtype, dim, (float *)s->queries + r * dim);
    }
#if HAVE_AMX
    /* Tiles of 16 rows: the rows past the tile's last are zero queries, their results unused. */
    const int64_t row_tiles = round_up(rows, TILE_ROWS) / TILE_ROWS;
    if (a->amx) {
        memset((uint16_t *)s->queries + rows * dim, 0, (size_t)((row_tiles * TILE_ROWS - rows) * dim) * sizeof(uint16_t));
        if (dim == 64) {
            attend_amx_64(packed, (const uint16_t *)s->queries, rows, first_position, group, padded, a->scale, s->outs,
                          s->sums, s->scores, s->probs);
            goto store;
        }
        scores_amx(packed, (const uint16_t *)s->queries, row_tiles, padded, dim, s->scores);
    } else
#endif
        tile_scores_vectors(a, s, packed, rows, padded);
    for (int64_t r = 0; r < rows; ++r) {
        float *scores = s->scores + r * padded;
#if HAVE_AMX
        if (a->amx) {
            s->sums[r] = softmax_row_bf16(scores, a->scale, first_position + r / group + 1, padded, s->probs + r * padded);
            continue;
        }
#endif
        s->sums[r] = softmax_row(scores, first_position + r / group + 1, padded);
        if (a->pairs) round_to_bf16(scores, s->probs + r * padded, padded);
    }
#if HAVE_AMX
    if (a->amx)
        values_amx(packed, s->probs, row_tiles, padded, dim, s->outs);
    else
#endif
        tile_values_vectors(a, s, packed, rows, padded);
#if HAVE_AMX
store:
#endif
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t token = a->chunk_rows[chunk] + first_query + r / group;
        const int64_t head = kv_head * group + r % group;
        char *dst = a->out + (size_t)((token * a->num_heads + head) * dim) * elem;
        store_row(dst, a->dtype, dim, s->outs + r * dim, 1.0f / s->sums[r]);
    }
}

/* Whether the bfloat16-pairs path serves this call (else float32 everywhere). */
static int use_pairs(int dtype, int cache_dtype, int64_t head_dim) {
    return HAVE_BF16_PAIRS && dtype == DTYPE_BFLOAT16 && (cache_dtype == DTYPE_BFLOAT16 || is_float8(cache_dtype)) &&
           (head_dim == 64 || head_dim == 128);
}

/*
 * q: [tokens, num_heads, head_dim] with tokens q_row_stride elements apart;
 * out: [tokens, num_heads, head_dim], contiguous; k_cache, v_cache: [blocks,
 * block_size, num_kv_heads, head_dim] of cache_dtype (dtype or an 8-bit float); chunk c's queries are rows
 * chunk_rows[c] .. + chunk_lens[c] at positions chunk_starts[c] onwards, its
 * table block_tables[c]. amx: multiply with AMX tiles where the bfloat16-pairs
 * path serves the call and this process may. Returns 0, or -1 if scratch
 * memory was short.
 */
int hawker_paged_prefill_attention(const void *q, const void *k_cache, const void *v_cache, void *out,
                                   const int64_t *block_tables, const int64_t *chunk_rows, const int64_t *chunk_lens,
                                   const int64_t *chunk_starts, int64_t num_chunks, int64_t table_stride,
                                   int64_t q_row_stride, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                   int64_t block_size, float scale, int dtype, int cache_dtype, int amx,
                                   int num_threads) {
    const int pairs = use_pairs(dtype, cache_dtype, head_dim);
    const PrefillArgs args = {q,          k_cache,      v_cache,      out,          block_tables,
                              chunk_rows, chunk_lens,   chunk_starts, table_stride, q_row_stride,
                              num_heads,  num_kv_heads, head_dim,     block_size,   scale,
                              dtype,      cache_dtype,  pairs,        pairs && amx && hawker_paged_prefill_attention_amx()};
    const int64_t dim = head_dim, group = num_heads / num_kv_heads;
    const size_t packed_elem = args.pairs ? 2 : 4; /* bytes a packed element takes */
    /* Each (chunk, KV head)'s packed keys start at first_key[c] * num_kv_heads + h * padded(c) positions. */
    int64_t *first_key = malloc((size_t)(num_chunks + 1) * sizeof(int64_t));
    if (first_key == NULL) return -1;
    int64_t longest = 1, tiles = 0, blocks = 0;
    first_key[0] = 0;
    for (int64_t c = 0; c < num_chunks; ++c) {
        const int64_t end = chunk_starts[c] + chunk_lens[c];
        longest = end > longest ? end : longest;
        tiles += round_up(chunk_lens[c], TILE_QUERIES) / TILE_QUERIES;
        blocks += round_up(end, KEY_SPAN) / KEYS;
        first_key[c + 1] = first_key[c] + round_up(end, KEY_SPAN);
    }
    const size_t packed_bytes = (size_t)(first_key[num_chunks] * num_kv_heads * dim) * packed_elem;
    char *packed_keys = malloc(packed_bytes ? packed_bytes : 1), *packed_values = malloc(packed_bytes ? packed_bytes : 1);
    Item *work = malloc((size_t)(tiles * num_kv_heads + 1) * sizeof(Item));
    int failed = !(packed_keys && packed_values && work);
    /* The last tiles of a chunk see the most keys: they go first, so the threads finish together. */
    int64_t items = 0;
    for (int64_t c = 0; c < num_chunks && !failed; ++c)
        for (int64_t tile = round_up(chunk_lens[c], TILE_QUERIES) / TILE_QUERIES - 1; tile >= 0; --tile)
            for (int64_t h = 0; h < num_kv_heads; ++h) work[items++] = (Item){c, h, tile};
    const int64_t padded = round_up(longest, KEY_SPAN), rows = TILE_QUERIES * group;
    /* Scores of a tile's rows, at least two steps of 16 rows by KEY_SPAN keys (attend_amx_64). */
    const int64_t score_floats = rows * padded > 2 * 16 * KEY_SPAN ? rows * padded : 2 * 16 * KEY_SPAN;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        char *queries = failed ? NULL : malloc((size_t)(rows * dim) * sizeof(float));
        float *scores = failed ? NULL : malloc((size_t)(score_floats + rows * dim + rows) * sizeof(float));
        uint16_t *probs = failed ? NULL : malloc((size_t)(rows * padded) * sizeof(uint16_t));
        const int ready = queries && scores && probs;
        float *outs = ready ? scores + score_floats : NULL;
        const Scratch scratch = {queries, scores, probs, outs, ready ? outs + rows * dim : NULL};
#if HAVE_AMX
        if (args.amx) amx_configure_tiles(); /* a thread's tile registers are its own */
#endif
        /* Every thread must reach both work-sharing loops, so failures only mark the call. */
#pragma omp for schedule(dynamic, 4)
        for (int64_t i = 0; i < blocks * num_kv_heads; ++i) {
            if (failed) continue;
            int64_t c = 0, block = i / num_kv_heads;
            while (block >= first_key[c + 1] / KEYS - first_key[c] / KEYS) block -= first_key[c + 1] / KEYS - first_key[c] / KEYS, ++c;
            const int64_t h = i % num_kv_heads, span = first_key[c + 1] - first_key[c];
            const size_t offset = (size_t)((first_key[c] * num_kv_heads + h * span) * dim) * packed_elem;
            const Packed packed = {packed_keys + offset, packed_values + offset};
            pack_block(&args, &packed, block_tables + c * table_stride, h, block * KEYS, chunk_starts[c] + chunk_lens[c]);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < items; ++i) {
            if (!ready) {
                failed = 1;
                continue;
            }
            const Item *item = &work[i];
            const int64_t span = first_key[item->chunk + 1] - first_key[item->chunk];
            const size_t offset = (size_t)((first_key[item->chunk] * num_kv_heads + item->kv_head * span) * dim) * packed_elem;
            const Packed packed = {packed_keys + offset, packed_values + offset};
            attend_tile(&args, &scratch, &packed, item->chunk, item->kv_head, item->tile);
        }
#if HAVE_AMX
        if (args.amx) _tile_release();
#endif
        free(queries), free(scores), free(probs);
    }
    free(packed_keys), free(packed_values), free(work), free(first_key);
    return failed ? -1 : 0;
}
