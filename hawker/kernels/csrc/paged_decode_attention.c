/*
 * Decode attention over the paged KV cache, read in place (CPU).
 *
 * One query token per sequence. Each sequence's keys and values are read block
 * by block through its block table, for all the query heads that share a KV
 * head (grouped-query attention), so no padded copy of the context is ever
 * made. On the bfloat16-pairs path a work item is a whole sequence: every
 * block's rows (all KV heads, contiguous) are read once, front to back, with
 * the blocks two ahead fetched meanwhile; elsewhere, and with
 * -DHAWKER_SEQUENCE_ITEMS=0 (the off switch, benchmarks/NOTES.md), an item is
 * one (sequence, KV head) pair that reads its head's slice of every row.
 *
 * The cache may hold 8-bit floats instead of the queries' dtype (kv_cache_dtype): their rows
 * are widened exactly as they are read (to bfloat16 for the bfloat16-pairs loops).
 *
 * Numerics: float32 accumulation; scores, softmax and the weighted sum of
 * values are computed in a fixed order that depends only on the sequence's
 * own context length, so a sequence's output is the same whatever else is in
 * the batch (and whichever thread runs it).
 *
 * Built at run time by hawker/kernels/native.py with -O3 -march=native
 * -fopenmp, for one shape of heads: HAWKER_GROUP query heads per KV head and
 * HEAD_DIM dims (compile-time constants, so queries and accumulators live in
 * registers; one build a shape, each in well under a second, instead of
 * every shape at once in six). Other shapes take the portable loops.
 */
#ifndef HAWKER_GROUP
#error "build with -DHAWKER_GROUP=<query heads per KV head> -DHAWKER_HEAD_DIM=<dims>"
#endif
#include "attention_common.h"

typedef struct {
    const char *q;
    const char *k_cache;
    const char *v_cache;
    char *out;
    const int64_t *block_tables;
    const int64_t *context_lens;
    int64_t table_stride;
    int64_t q_row_stride; /* elements between consecutive sequences' queries */
    int64_t num_heads;
    int64_t num_kv_heads;
    int64_t head_dim;
    int64_t block_size;
    float scale;
    int dtype;       /* of the queries and the output */
    int cache_dtype; /* of the keys and values: the queries' or an 8-bit float */
} DecodeArgs;

/* Scratch of one thread: queries, accumulators, cache rows, and the scores. */
typedef struct {
    float *queries; /* [group, dim] */
    float *acc;     /* [group, dim] */
    float *rows;    /* [dim]: a cache row widened to float (portable path) */
    float *scores;  /* [group, max_len] */
    uint16_t *widened; /* [16, dim]: a block of 8-bit cache rows as bfloat16 (pairs path) */
    float *head_acc;   /* [num_heads, dim]: every head's accumulators (whole-sequence items) */
} Scratch;


/* Walks a sequence's cache rows in position order without a division per position. */
typedef struct {
    const char *base; /* row (block 0, slot 0) of this KV head */
    const int64_t *table;
    size_t row_bytes;   /* between consecutive slots */
    size_t block_bytes; /* between consecutive blocks */
    int64_t block_size;
    int64_t block; /* index into table */
    int64_t offset;
} RowCursor;

static inline RowCursor row_cursor(const DecodeArgs *a, const char *cache, const int64_t *table, int64_t kv_head) {
    const size_t elem = element_size(a->cache_dtype);
    const size_t row_bytes = (size_t)(a->num_kv_heads * a->head_dim) * elem;
    RowCursor cursor = {cache + (size_t)(kv_head * a->head_dim) * elem, table, row_bytes,
                        row_bytes * (size_t)a->block_size, a->block_size, 0, 0};
    return cursor;
}

/* The current row, then advance to the next position. */
static inline const char *next_row(RowCursor *cursor) {
    const char *row = cursor->base + (size_t)cursor->table[cursor->block] * cursor->block_bytes +
                      (size_t)cursor->offset * cursor->row_bytes;
    if (++cursor->offset == cursor->block_size) {
        cursor->offset = 0;
        ++cursor->block;
    }
    return row;
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* The float16 bits of 16 or 32 8-bit floats (float8_half_bits, 16 lanes at a time). */
static inline __m256i half_bits16(__m256i bytes, int dtype) {
    if (dtype == DTYPE_FLOAT8_E5M2) return _mm256_slli_epi16(bytes, 8);
    return _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(bytes, _mm256_set1_epi16(0x80)), 8),
                           _mm256_slli_epi16(_mm256_and_si256(bytes, _mm256_set1_epi16(0x7f)), 7));
}

static inline __m512 float8_values16(__m256i half_bits, int dtype) {
    const __m512 values = _mm512_cvtph_ps(half_bits);
    return dtype == DTYPE_FLOAT8_E5M2 ? values : _mm512_mul_ps(values, _mm512_set1_ps(FLOAT8_E4M3_FACTOR));
}

static inline __m512 load16(const char *src, int dtype) {
    if (is_float8(dtype))
        return float8_values16(half_bits16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)src)), dtype), dtype);
    if (dtype == DTYPE_BFLOAT16) {
        __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src));
        return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
    }
    if (dtype == DTYPE_FLOAT16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)src));
    return _mm512_loadu_ps((const float *)src);
}

/* Rows come from scattered blocks: fetch the row this many positions ahead while this one is used.
 * Both settable with -D for experiments (benchmarks/NOTES.md: 16 rows into L1 is as good as any). */
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 16
#endif
#ifndef PREFETCH_HINT
#define PREFETCH_HINT _MM_HINT_T0
#endif

static inline RowCursor cursor_ahead(RowCursor cursor, int64_t steps) {
    for (int64_t i = 0; i < steps; ++i) (void)next_row(&cursor);
    return cursor;
}

static inline void prefetch_next(RowCursor *ahead, int64_t t, int64_t len, size_t bytes) {
    if (PREFETCH_AHEAD == 0 || t + PREFETCH_AHEAD >= len) return;
    const char *row = next_row(ahead);
    for (size_t offset = 0; offset < bytes; offset += 64) _mm_prefetch(row + offset, PREFETCH_HINT);
}

/* The shape this build specialises (accumulators in registers) when it has a vector loop. */
#define MAX_GROUP 8
#define VECTOR_SHAPE ((HAWKER_HEAD_DIM == 64 || HAWKER_HEAD_DIM == 128) && HAWKER_GROUP >= 1 && HAWKER_GROUP <= MAX_GROUP)
static int vector_path(int64_t dim, int64_t group) {
    return VECTOR_SHAPE && dim == HAWKER_HEAD_DIM && group == HAWKER_GROUP;
}

static inline float sum_lanes(__m512 v) {
    __m256 half = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 quarter = _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
    quarter = _mm_add_ps(quarter, _mm_movehl_ps(quarter, quarter));
    quarter = _mm_add_ss(quarter, _mm_movehdup_ps(quarter));
    return _mm_cvtss_f32(quarter);
}

/* scores[g, t] = q_g . k_t for GROUP query heads and CHUNKS x 16 dims, both compile-time constants
 * so that the queries and accumulators stay in registers. */
static inline __attribute__((always_inline)) void key_scores_fixed(const DecodeArgs *a, const Scratch *s,
                                                                   const int64_t *table, int64_t len,
                                                                   int64_t kv_head, const int GROUP,
                                                                   const int CHUNKS) {
    const size_t chunk_bytes = 16 * element_size(a->cache_dtype);
    __m512 query[MAX_GROUP][8];
    for (int g = 0; g < GROUP; ++g)
        for (int c = 0; c < CHUNKS; ++c) query[g][c] = _mm512_loadu_ps(s->queries + g * CHUNKS * 16 + c * 16);
    RowCursor keys = row_cursor(a, a->k_cache, table, kv_head);
    RowCursor ahead = cursor_ahead(keys, len < PREFETCH_AHEAD ? len : PREFETCH_AHEAD);
    for (int64_t t = 0; t < len; ++t) {
        prefetch_next(&ahead, t, len, CHUNKS * chunk_bytes);
        const char *src = next_row(&keys);
        __m512 key[8];
        for (int c = 0; c < CHUNKS; ++c) key[c] = load16(src + c * chunk_bytes, a->cache_dtype);
        for (int g = 0; g < GROUP; ++g) {
            __m512 acc = _mm512_mul_ps(query[g][0], key[0]);
            for (int c = 1; c < CHUNKS; ++c) acc = _mm512_fmadd_ps(query[g][c], key[c], acc);
            s->scores[g * len + t] = sum_lanes(acc);
        }
    }
}

/* acc[g] = sum_t weight[g, t] v_t, in position order, accumulators in registers. */
static inline __attribute__((always_inline)) void weighted_values_fixed(const DecodeArgs *a, const Scratch *s,
                                                                        const int64_t *table, int64_t len,
                                                                        int64_t kv_head, const int GROUP,
                                                                        const int CHUNKS) {
    const size_t chunk_bytes = 16 * element_size(a->cache_dtype);
    __m512 acc[MAX_GROUP][8];
    for (int g = 0; g < GROUP; ++g)
        for (int c = 0; c < CHUNKS; ++c) acc[g][c] = _mm512_setzero_ps();
    RowCursor values = row_cursor(a, a->v_cache, table, kv_head);
    RowCursor ahead = cursor_ahead(values, len < PREFETCH_AHEAD ? len : PREFETCH_AHEAD);
    for (int64_t t = 0; t < len; ++t) {
        prefetch_next(&ahead, t, len, CHUNKS * chunk_bytes);
        const char *src = next_row(&values);
        __m512 value[8];
        for (int c = 0; c < CHUNKS; ++c) value[c] = load16(src + c * chunk_bytes, a->cache_dtype);
        for (int g = 0; g < GROUP; ++g) {
            const __m512 weight = _mm512_set1_ps(s->scores[g * len + t]);
            for (int c = 0; c < CHUNKS; ++c) acc[g][c] = _mm512_fmadd_ps(weight, value[c], acc[g][c]);
        }
    }
    for (int g = 0; g < GROUP; ++g)
        for (int c = 0; c < CHUNKS; ++c) _mm512_storeu_ps(s->acc + g * CHUNKS * 16 + c * 16, acc[g][c]);
}

#if defined(__AVX512BF16__)
/*
 * bfloat16 pairs (vdpbf16ps), 16 keys at a time: each key's dot product with a
 * query leaves 16 partial sums; a transpose-and-add tree turns the 16 keys'
 * vectors into one vector of their 16 scores (no horizontal sum per key, and
 * no widening of the keys), and the values are taken two keys at a time.
 */
#define PAIRS_PATH 1

/* out[j] = sum of the lanes of a[j], for 16 vectors; the order of the sums is fixed. */
static inline __m512 transpose_add16(const __m512 a[16]) {
    __m512 b[8], c[4], d[2];
    for (int i = 0; i < 8; ++i)
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; ++i)
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 2; ++i)
        d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* 32 8-bit floats as bfloat16 (exact: every such value fits). */
static inline __m512i widen32_float8(const char *src, int dtype) {
    const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)src));
    const __m512 low = float8_values16(half_bits16(_mm512_castsi512_si256(bytes), dtype), dtype);
    const __m512 high = float8_values16(half_bits16(_mm512_extracti64x4_epi64(bytes, 1), dtype), dtype);
    return (__m512i)_mm512_cvtne2ps_pbh(high, low);
}

/* The rows of the block of (up to) 16 positions from `first`, fetching the rows ahead, as bfloat16:
 * in place for a bfloat16 cache, widened into the thread's scratch for an 8-bit one; returns how many. */
static inline int64_t next_block(const DecodeArgs *a, const Scratch *s, RowCursor *cursor, RowCursor *ahead,
                                 int64_t first, int64_t len, const char *rows[16]) {
    const size_t bytes = (size_t)a->head_dim * element_size(a->cache_dtype);
    const int64_t count = len - first < 16 ? len - first : 16;
    for (int64_t j = 0; j < count; ++j) {
        rows[j] = next_row(cursor);
        prefetch_next(ahead, first + j, len, bytes);
        if (is_float8(a->cache_dtype)) {
            uint16_t *wide = s->widened + j * a->head_dim;
            for (int64_t d = 0; d < a->head_dim; d += 32)
                _mm512_storeu_si512(wide + d, widen32_float8(rows[j] + d, a->cache_dtype));
            rows[j] = (const char *)wide;
        }
    }
    return count;
}

/* scores[g, t] = scale * q_g . k_t, CHUNKS x 32 dims as bfloat16 pairs. */
static inline __attribute__((always_inline)) void key_scores_pairs_fixed(const DecodeArgs *a, const Scratch *s,
                                                                         const int64_t *table, int64_t len,
                                                                         int64_t kv_head, const uint16_t *queries,
                                                                         const int GROUP, const int CHUNKS) {
    const __m512 scale = _mm512_set1_ps(a->scale);
    RowCursor keys = row_cursor(a, a->k_cache, table, kv_head);
    RowCursor ahead = cursor_ahead(keys, len < PREFETCH_AHEAD ? len : PREFETCH_AHEAD);
    for (int64_t first = 0; first < len; first += 16) {
        const char *rows[16];
        const int64_t count = next_block(a, s, &keys, &ahead, first, len, rows);
        for (int g = 0; g < GROUP; ++g) {
            __m512bh query[4];
            for (int c = 0; c < CHUNKS; ++c)
                query[c] = (__m512bh)_mm512_loadu_si512(queries + g * a->head_dim + c * 32);
            __m512 acc[16];
            for (int j = 0; j < 16; ++j) {
                acc[j] = _mm512_setzero_ps();
                if (j < count)
                    for (int c = 0; c < CHUNKS; ++c)
                        acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_loadu_si512(rows[j] + c * 64), query[c]);
            }
            _mm512_mask_storeu_ps(s->scores + g * len + first, (__mmask16)((1u << count) - 1),
                                  _mm512_mul_ps(transpose_add16(acc), scale));
        }
    }
}

/* weights[g]: the `count` (<= 16) weights of head g from scores_g[0..] as 8 bfloat16 pairs. */
static inline __attribute__((always_inline)) void weight_pairs(uint32_t weights[MAX_GROUP][8], const float *scores,
                                                               int64_t head_stride, int64_t count, const int GROUP) {
    for (int g = 0; g < GROUP; ++g) {
        const __m512 run = _mm512_maskz_loadu_ps(lanes_below(count), scores + g * head_stride);
        _mm256_storeu_si256((__m256i *)weights[g], (__m256i)_mm512_cvtneps_pbh(run));
    }
}

/* acc[g] += the pair `pair` of head g's weights times two value rows (`odd` NULL past the last), chunk by chunk;
 * acc[g][2c] lane 4k+i holds dim 32c+8k+i, acc[g][2c+1] dim 32c+8k+4+i (vpunpck{l,h}wd's order). */
static inline __attribute__((always_inline)) void add_value_pair(__m512 acc[MAX_GROUP][8],
                                                                 const uint32_t weights[MAX_GROUP][8],
                                                                 const char *even_row, const char *odd_row,
                                                                 int64_t pair, const int GROUP, const int CHUNKS) {
    for (int c = 0; c < CHUNKS; ++c) {
        const __m512i even = _mm512_loadu_si512(even_row + c * 64);
        const __m512i odd = odd_row ? _mm512_loadu_si512(odd_row + c * 64) : _mm512_setzero_si512();
        const __m512bh low = (__m512bh)_mm512_unpacklo_epi16(even, odd);
        const __m512bh high = (__m512bh)_mm512_unpackhi_epi16(even, odd);
        for (int g = 0; g < GROUP; ++g) {
            const __m512bh weight = (__m512bh)_mm512_set1_epi32((int)weights[g][pair]);
            acc[g][2 * c] = _mm512_dpbf16_ps(acc[g][2 * c], low, weight);
            acc[g][2 * c + 1] = _mm512_dpbf16_ps(acc[g][2 * c + 1], high, weight);
        }
    }
}

/* 32 dims in add_value_pair's lane order (even: acc[g][2c], odd: acc[g][2c+1]) stored in dimension order:
 * dims 32c+16h .. +15 come from lanes 8h.. of the low and high halves. */
static inline void store_dimension_order(__m512 even, __m512 odd, float *dst) {
    const __m512i first_half = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i second_half = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
    _mm512_storeu_ps(dst, _mm512_permutex2var_ps(even, first_half, odd));
    _mm512_storeu_ps(dst + 16, _mm512_permutex2var_ps(even, second_half, odd));
}

/* acc[g] = sum_t weight[g, t] v_t, two keys a step as bfloat16 pairs (the weights rounded to bfloat16). */
static inline __attribute__((always_inline)) void weighted_values_pairs_fixed(const DecodeArgs *a, const Scratch *s,
                                                                              const int64_t *table, int64_t len,
                                                                              int64_t kv_head, const int GROUP,
                                                                              const int CHUNKS) {
    __m512 acc[MAX_GROUP][8]; /* add_value_pair's lane order */
    for (int g = 0; g < GROUP; ++g)
        for (int c = 0; c < 2 * CHUNKS; ++c) acc[g][c] = _mm512_setzero_ps();
    RowCursor values = row_cursor(a, a->v_cache, table, kv_head);
    RowCursor ahead = cursor_ahead(values, len < PREFETCH_AHEAD ? len : PREFETCH_AHEAD);
    for (int64_t first = 0; first < len; first += 16) {
        const char *rows[16];
        const int64_t count = next_block(a, s, &values, &ahead, first, len, rows);
        uint32_t weights[MAX_GROUP][8];
        weight_pairs(weights, s->scores + first, len, count, GROUP);
        for (int64_t j = 0; j < count; j += 2)
            add_value_pair(acc, weights, rows[j], j + 1 < count ? rows[j + 1] : NULL, j / 2, GROUP, CHUNKS);
    }
    for (int g = 0; g < GROUP; ++g)
        for (int c = 0; c < CHUNKS; ++c)
            store_dimension_order(acc[g][2 * c], acc[g][2 * c + 1], s->acc + g * a->head_dim + c * 32);
}

static void key_scores_pairs(const DecodeArgs *a, const Scratch *s, const int64_t *table, int64_t len,
                             int64_t kv_head, const uint16_t *queries) {
#if VECTOR_SHAPE
    key_scores_pairs_fixed(a, s, table, len, kv_head, queries, HAWKER_GROUP, HAWKER_HEAD_DIM / 32);
#else
    (void)a, (void)s, (void)table, (void)len, (void)kv_head, (void)queries;
#endif
}

static void weighted_values_pairs(const DecodeArgs *a, const Scratch *s, const int64_t *table, int64_t len,
                                  int64_t kv_head) {
#if VECTOR_SHAPE
    weighted_values_pairs_fixed(a, s, table, len, kv_head, HAWKER_GROUP, HAWKER_HEAD_DIM / 32);
#else
    (void)a, (void)s, (void)table, (void)len, (void)kv_head;
#endif
}
#else
#define PAIRS_PATH 0
#endif

/* The vector loops of this build's shape (vector_path says when they apply); `group` is HAWKER_GROUP. */
static void key_scores(const DecodeArgs *a, const Scratch *s, const int64_t *table, int64_t len, int64_t kv_head,
                       int64_t group) {
    (void)group;
#if VECTOR_SHAPE
    key_scores_fixed(a, s, table, len, kv_head, HAWKER_GROUP, HAWKER_HEAD_DIM / 16);
#else
    (void)a, (void)s, (void)table, (void)len, (void)kv_head;
#endif
}

static void weighted_values(const DecodeArgs *a, const Scratch *s, const int64_t *table, int64_t len,
                            int64_t kv_head, int64_t group) {
    (void)group;
#if VECTOR_SHAPE
    weighted_values_fixed(a, s, table, len, kv_head, HAWKER_GROUP, HAWKER_HEAD_DIM / 16);
#else
    (void)a, (void)s, (void)table, (void)len, (void)kv_head;
#endif
}
#else
static int vector_path(int64_t dim, int64_t group) {
    (void)dim, (void)group;
    return 0;
}
static void key_scores(const DecodeArgs *a, const Scratch *s, const int64_t *table, int64_t len, int64_t kv_head,
                       int64_t group) {
    (void)a, (void)s, (void)table, (void)len, (void)kv_head, (void)group;
}
static void weighted_values(const DecodeArgs *a, const Scratch *s, const int64_t *table, int64_t len,
                            int64_t kv_head, int64_t group) {
    (void)a, (void)s, (void)table, (void)len, (void)kv_head, (void)group;
}
#endif

/* The portable versions of key_scores and weighted_values (any head size, any CPU). */
static void key_scores_portable(const DecodeArgs *a, const Scratch *s, const int64_t *table, int64_t len,
                                int64_t kv_head, int64_t group) {
    const int64_t dim = a->head_dim;
    RowCursor keys = row_cursor(a, a->k_cache, table, kv_head);
    for (int64_t t = 0; t < len; ++t) {
        load_row(next_row(&keys), a->cache_dtype, dim, s->rows);
        for (int64_t g = 0; g < group; ++g) {
            const float *query = s->queries + g * dim;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < dim; ++d) dot += query[d] * s->rows[d];
            s->scores[g * len + t] = dot;
        }
    }
}

static void weighted_values_portable(const DecodeArgs *a, const Scratch *s, const int64_t *table, int64_t len,
                                     int64_t kv_head, int64_t group) {
    const int64_t dim = a->head_dim;
    memset(s->acc, 0, (size_t)(group * dim) * sizeof(float));
    RowCursor values = row_cursor(a, a->v_cache, table, kv_head);
    for (int64_t t = 0; t < len; ++t) {
        load_row(next_row(&values), a->cache_dtype, dim, s->rows);
        for (int64_t g = 0; g < group; ++g) {
            const float weight = s->scores[g * len + t];
            float *acc = s->acc + g * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) acc[d] += weight * s->rows[d];
        }
    }
}

/* Softmax weights (unnormalised) in place; writes each head's sum to sums[g]. */
static void softmax_weights(float *scores_all, int64_t len, int64_t group, float *sums) {
    for (int64_t g = 0; g < group; ++g) sums[g] = softmax_row(scores_all + g * len, len, len);
}

#ifndef PAIRS_PATH
#define PAIRS_PATH 0
#endif

static void attend_one(const DecodeArgs *a, const Scratch *s, int64_t seq, int64_t kv_head) {
    const int64_t group = a->num_heads / a->num_kv_heads, dim = a->head_dim;
    const int64_t len = a->context_lens[seq];
    const size_t elem = element_size(a->dtype);
    const int64_t *table = a->block_tables + seq * a->table_stride;
    const int64_t first_head = kv_head * group;
    float sums[group];
#if PAIRS_PATH
    if (a->dtype == DTYPE_BFLOAT16 && (a->cache_dtype == DTYPE_BFLOAT16 || is_float8(a->cache_dtype)) &&
        vector_path(dim, group)) {
        const uint16_t *queries = (const uint16_t *)a->q + seq * a->q_row_stride + first_head * dim;
        key_scores_pairs(a, s, table, len, kv_head, queries);
        softmax_weights(s->scores, len, group, sums);
        weighted_values_pairs(a, s, table, len, kv_head);
        for (int64_t g = 0; g < group; ++g) {
            char *dst = a->out + (size_t)((seq * a->num_heads + first_head + g) * dim) * elem;
            store_row(dst, a->dtype, dim, s->acc + g * dim, 1.0f / sums[g]);
        }
        return;
    }
#endif
    for (int64_t g = 0; g < group; ++g) {
        const char *src = a->q + (size_t)(seq * a->q_row_stride + (first_head + g) * dim) * elem;
        load_row(src, a->dtype, dim, s->queries + g * dim);
        for (int64_t d = 0; d < dim; ++d) s->queries[g * dim + d] *= a->scale;
    }
    const int vector = vector_path(dim, group);
    (vector ? key_scores : key_scores_portable)(a, s, table, len, kv_head, group);
    softmax_weights(s->scores, len, group, sums);
    (vector ? weighted_values : weighted_values_portable)(a, s, table, len, kv_head, group);
    for (int64_t g = 0; g < group; ++g) {
        char *dst = a->out + (size_t)((seq * a->num_heads + first_head + g) * dim) * elem;
        store_row(dst, a->dtype, dim, s->acc + g * dim, 1.0f / sums[g]);
    }
}


#ifndef HAWKER_SEQUENCE_ITEMS
#define HAWKER_SEQUENCE_ITEMS 1
#endif
#if PAIRS_PATH && VECTOR_SHAPE && HAWKER_SEQUENCE_ITEMS
#define SEQUENCE_PATH 1
/*
 * Whole-sequence items. A (sequence, KV head) item reads 128 of every 384 bytes of a row and waits on
 * each row's lines in turn (line-fill buffers full, benchmarks/NOTES.md, session 10); reading a block's
 * rows whole, front to back, with the blocks BLOCKS_AHEAD on already requested into L2, keeps the
 * memory busy instead: 48 decodes, contexts 32-400, 480-520 against 600-650 us a layer (NOTES.md).
 */
#ifndef BLOCKS_AHEAD
#define BLOCKS_AHEAD 2
#endif

/* Where a sequence's rows are: its block table, the first row of each block, the rows' layout. */
typedef struct {
    const int64_t *table;
    int64_t len;
    int64_t blocks;
    size_t row_bytes;   /* one position, every KV head */
    size_t block_bytes; /* one block of positions */
} SequenceRows;

static inline SequenceRows sequence_rows(const DecodeArgs *a, int64_t seq) {
    const size_t row_bytes = (size_t)(a->num_kv_heads * a->head_dim) * element_size(a->cache_dtype);
    const int64_t len = a->context_lens[seq];
    const SequenceRows rows = {a->block_tables + seq * a->table_stride, len,
                               (len + a->block_size - 1) / a->block_size, row_bytes,
                               row_bytes * (size_t)a->block_size};
    return rows;
}

/* Requests block b + BLOCKS_AHEAD's lines into L2 (at b == 0, every block up to it). Always inlined: GCC
 * finds a separate function of prefetches free of side effects and drops its calls. */
static inline __attribute__((always_inline)) void prefetch_blocks_ahead(const char *cache, const SequenceRows *r, int64_t b) {
    for (int64_t ahead = b == 0 ? 1 : BLOCKS_AHEAD; ahead <= BLOCKS_AHEAD && b + ahead < r->blocks; ++ahead) {
        const char *block = cache + (size_t)r->table[b + ahead] * r->block_bytes;
        for (size_t offset = 0; offset < r->block_bytes; offset += 64) _mm_prefetch(block + offset, _MM_HINT_T1);
    }
}

/* One KV head's `count` rows from `rows` as bfloat16: in place (returning the stride between them) for a
 * bfloat16 cache, widened into the thread's scratch for an 8-bit one. */
static inline const char *head_rows(const DecodeArgs *a, const Scratch *s, const SequenceRows *r, const char *rows,
                                    int64_t kv_head, int64_t count, size_t *stride) {
    const char *first = rows + (size_t)(kv_head * a->head_dim) * element_size(a->cache_dtype);
    if (!is_float8(a->cache_dtype)) {
        *stride = r->row_bytes;
        return first;
    }
    for (int64_t j = 0; j < count; ++j)
        for (int64_t d = 0; d < a->head_dim; d += 32)
            _mm512_storeu_si512(s->widened + j * a->head_dim + d,
                                widen32_float8(first + (size_t)j * r->row_bytes + d, a->cache_dtype));
    *stride = (size_t)a->head_dim * 2;
    return (const char *)s->widened;
}

/* Calls visit(rows, first, count) for each run of up to 16 positions that lie in one block, in order. */
#define FOR_EACH_RUN(a, cache, r, rows, first, count, body)                                              \
    for (int64_t b_ = 0; b_ < (r).blocks; ++b_) {                                                      \
        prefetch_blocks_ahead((cache), &(r), b_);                                                      \
        const char *block_ = (cache) + (size_t)(r).table[b_] * (r).block_bytes;                        \
        const int64_t end_ = (b_ + 1) * (a)->block_size < (r).len ? (b_ + 1) * (a)->block_size : (r).len; \
        for (int64_t first = b_ * (a)->block_size; first < end_; first += 16) {                       \
            const int64_t count = end_ - first < 16 ? end_ - first : 16;                              \
            const char *rows = block_ + (size_t)(first - b_ * (a)->block_size) * (r).row_bytes;       \
            body                                                                                       \
        }                                                                                              \
    }

/* scores[h * GROUP + g, t] = scale * q_hg . k_ht for every head, the same sums as key_scores_pairs. */
static void sequence_key_scores(const DecodeArgs *a, const Scratch *s, const SequenceRows *r, const uint16_t *q) {
    enum { GROUP = HAWKER_GROUP, CHUNKS = HAWKER_HEAD_DIM / 32, DIM = HAWKER_HEAD_DIM };
    const __m512 scale = _mm512_set1_ps(a->scale);
    FOR_EACH_RUN(a, a->k_cache, *r, rows, first, count, {
        for (int64_t h = 0; h < a->num_kv_heads; ++h) {
            size_t stride;
            const char *keys = head_rows(a, s, r, rows, h, count, &stride);
            for (int g = 0; g < GROUP; ++g) {
                __m512bh query[CHUNKS];
                for (int c = 0; c < CHUNKS; ++c)
                    query[c] = (__m512bh)_mm512_loadu_si512(q + (h * GROUP + g) * DIM + c * 32);
                __m512 acc[16];
                for (int j = 0; j < 16; ++j) {
                    acc[j] = _mm512_setzero_ps();
                    if (j < count)
                        for (int c = 0; c < CHUNKS; ++c)
                            acc[j] = _mm512_dpbf16_ps(
                                acc[j], (__m512bh)_mm512_loadu_si512(keys + (size_t)j * stride + c * 64), query[c]);
                }
                _mm512_mask_storeu_ps(s->scores + (h * GROUP + g) * r->len + first, lanes_below(count),
                                      _mm512_mul_ps(transpose_add16(acc), scale));
            }
        }
    })
}

/* head_acc[h * GROUP + g] += sum_t weight[h * GROUP + g, t] v_ht, the same sums as weighted_values_pairs
 * (accumulators in weighted_values_pairs' lane order). */
static void sequence_weighted_values(const DecodeArgs *a, const Scratch *s, const SequenceRows *r) {
    enum { GROUP = HAWKER_GROUP, CHUNKS = HAWKER_HEAD_DIM / 32, DIM = HAWKER_HEAD_DIM };
    memset(s->head_acc, 0, (size_t)(a->num_heads * DIM) * sizeof(float));
    FOR_EACH_RUN(a, a->v_cache, *r, rows, first, count, {
        for (int64_t h = 0; h < a->num_kv_heads; ++h) {
            size_t stride;
            const char *values = head_rows(a, s, r, rows, h, count, &stride);
            uint32_t weights[MAX_GROUP][8];
            weight_pairs(weights, s->scores + h * GROUP * r->len + first, r->len, count, GROUP);
            __m512 acc[MAX_GROUP][8];
            float *head_acc = s->head_acc + h * GROUP * DIM;
            for (int g = 0; g < GROUP; ++g)
                for (int c = 0; c < 2 * CHUNKS; ++c) acc[g][c] = _mm512_loadu_ps(head_acc + g * DIM + c * 16);
            for (int64_t j = 0; j < count; j += 2) {
                const char *row = values + (size_t)j * stride;
                add_value_pair(acc, weights, row, j + 1 < count ? row + stride : NULL, j / 2, GROUP, CHUNKS);
            }
            for (int g = 0; g < GROUP; ++g)
                for (int c = 0; c < 2 * CHUNKS; ++c) _mm512_storeu_ps(head_acc + g * DIM + c * 16, acc[g][c]);
        }
    })
}

static void attend_sequence(const DecodeArgs *a, const Scratch *s, int64_t seq) {
    enum { CHUNKS = HAWKER_HEAD_DIM / 32, DIM = HAWKER_HEAD_DIM };
    const SequenceRows rows = sequence_rows(a, seq);
    sequence_key_scores(a, s, &rows, (const uint16_t *)a->q + seq * a->q_row_stride);
    float sums[a->num_heads];
    softmax_weights(s->scores, rows.len, a->num_heads, sums);
    sequence_weighted_values(a, s, &rows);
    /* Back to dimension order, then normalised into the output. */
    for (int64_t head = 0; head < a->num_heads; ++head) {
        const float *acc = s->head_acc + head * DIM;
        float out[DIM];
        for (int c = 0; c < CHUNKS; ++c)
            store_dimension_order(_mm512_loadu_ps(acc + 2 * c * 16), _mm512_loadu_ps(acc + (2 * c + 1) * 16),
                                  out + c * 32);
        store_row(a->out + (size_t)((seq * a->num_heads + head) * DIM) * element_size(a->dtype), a->dtype, DIM, out,
                  1.0f / sums[head]);
    }
}

#ifndef HAWKER_DECODE_AMX
#define HAWKER_DECODE_AMX 1
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && HAWKER_DECODE_AMX && HAWKER_HEAD_DIM == 64
#define AMX_PATH 1
#include "amx_tiles.h"
/*
 * Whole-sequence items on AMX tiles (64-dim heads, up to 16 query heads, a bfloat16 cache in blocks of a
 * multiple of 16 positions). vdpbf16ps retires one every two cycles here, which held the vector loops to about
 * half the bandwidth the cache is read at; a tile multiply does 16 of them. Both passes read the cache rows
 * in place, 16 positions a run:
 *  - key scores: the run's keys of one KV head (16 positions x 32 dims, rows row_bytes apart) are an A tile;
 *    the queries a B tile whose columns are the query heads, only the KV head's own group's columns non-zero,
 *    so one float32 tile sums every head's scores for the run (each from its own KV head alone); its columns
 *    are then gathered into `scores` (head-major, as the vector loops leave them);
 *  - weighted values: the run's values of one KV head are a B tile as they lie, 16 positions by 16 pairs of
 *    dims; an A tile with row m holding head m's weights in the even halves of its pairs (odd halves zero)
 *    picks out the even dims, one with them in the odd halves the odd dims, so no value is repacked. Rows of
 *    the other KV heads' query heads are zero, so four tiles (even and odd dims of the two 32-dim halves)
 *    sum every head's values.
 * A sequence's sums still depend only on its own rows, in a fixed order, so its output is the same whatever
 * else is in the batch; the tile unit orders each 32-dim product's sums its own way, so the bits differ from
 * the vector loops' (HAWKER_DECODE_ATTENTION_AMX=0 builds without this path).
 */
enum { AMX_RUN = 16, AMX_HEADS = 16, TILE_BYTES = 1024 };

/* A thread's tiles and rows for the AMX path, 64-byte aligned. */
typedef struct {
    uint32_t *queries; /* [kv_heads][2] B tiles: [16 dim pairs][16 query heads] bfloat16 pairs */
    uint32_t *weights; /* [kv_heads][2] A tiles (even, odd): [16 query heads][16 positions] */
    float *sums;       /* two 16 x 16 tiles of float32 */
    char *padded;      /* a short run's 16 rows (every KV head), zero past its end */
} AmxScratch;

static int amx_path(const DecodeArgs *a) {
    return a->cache_dtype == DTYPE_BFLOAT16 && a->num_heads <= AMX_HEADS && a->block_size % AMX_RUN == 0;
}

static size_t amx_scratch_bytes(const DecodeArgs *a) {
    return (size_t)a->num_kv_heads * 4 * TILE_BYTES + 2 * TILE_BYTES + AMX_RUN * (size_t)(a->num_kv_heads * 64 * 2);
}

static AmxScratch amx_scratch(const DecodeArgs *a, char *memory) {
    memset(memory, 0, amx_scratch_bytes(a)); /* the columns and rows of other KV heads stay zero */
    const size_t tiles = (size_t)a->num_kv_heads * 2 * TILE_BYTES;
    const AmxScratch scratch = {(uint32_t *)memory, (uint32_t *)(memory + tiles), (float *)(memory + 2 * tiles),
                                memory + 2 * tiles + 2 * TILE_BYTES};
    return scratch;
}

/* The sequence's queries into the B tiles: tile (h, c) row p column n = dims 32c + 2p, +1 of head n. */
static void amx_query_tiles(const DecodeArgs *a, const AmxScratch *x, const uint16_t *q) {
    const int64_t group = a->num_heads / a->num_kv_heads;
    for (int64_t h = 0; h < a->num_kv_heads; ++h)
        for (int64_t c = 0; c < 2; ++c) {
            uint32_t *tile = x->queries + (h * 2 + c) * (TILE_BYTES / 4);
            for (int64_t n = h * group; n < (h + 1) * group; ++n) {
                const uint32_t *pairs = (const uint32_t *)(q + n * 64) + c * 16;
                for (int64_t p = 0; p < 16; ++p) tile[p * 16 + n] = pairs[p];
            }
        }
}

/* The run's rows where a tile may read 16 of them: in place, or copied with zeros after a short run's end. */
static inline const char *amx_run_rows(const AmxScratch *x, const SequenceRows *r, const char *rows, int64_t count) {
    if (count == AMX_RUN) return rows;
    memcpy(x->padded, rows, (size_t)count * r->row_bytes);
    memset(x->padded + (size_t)count * r->row_bytes, 0, (size_t)(AMX_RUN - count) * r->row_bytes);
    return x->padded;
}

/* scores[n, t] = scale * q_n . k_t: tmm0 the run's sums, tmm1 a KV head's keys, tmm2 its queries. */
static void amx_key_scores(const DecodeArgs *a, const Scratch *s, const AmxScratch *x, const SequenceRows *r) {
    const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32(16));
    const __m512 scale = _mm512_set1_ps(a->scale);
    FOR_EACH_RUN(a, a->k_cache, *r, rows, first, count, {
        const char *keys = amx_run_rows(x, r, rows, count);
        _tile_zero(0);
        for (int64_t h = 0; h < a->num_kv_heads; ++h) {
            _tile_loadd(1, keys + h * 128, (int64_t)r->row_bytes);
            _tile_loadd(2, x->queries + (h * 2) * (TILE_BYTES / 4), 64);
            _tile_dpbf16ps(0, 1, 2);
            _tile_loadd(1, keys + h * 128 + 64, (int64_t)r->row_bytes);
            _tile_loadd(2, x->queries + (h * 2 + 1) * (TILE_BYTES / 4), 64);
            _tile_dpbf16ps(0, 1, 2);
        }
        _tile_stored(0, x->sums, 64);
        for (int64_t n = 0; n < a->num_heads; ++n)
            _mm512_mask_storeu_ps(s->scores + n * r->len + first, lanes_below(count),
                                  _mm512_mul_ps(_mm512_i32gather_ps(column, x->sums + n, 4), scale));
    })
}

/* head_acc[n] = sum_t weight[n, t] v_t in dimension order: tmm0-3 the sums (even, odd dims of each 32-dim
 * half), tmm4-5 a KV head's weights (even, odd), tmm6 its values. */
static void amx_weighted_values(const DecodeArgs *a, const Scratch *s, const AmxScratch *x, const SequenceRows *r) {
    const int64_t group = a->num_heads / a->num_kv_heads;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    FOR_EACH_RUN(a, a->v_cache, *r, rows, first, count, {
        const char *values = amx_run_rows(x, r, rows, count);
        for (int64_t h = 0; h < a->num_kv_heads; ++h) {
            uint32_t *even = x->weights + (h * 2) * (TILE_BYTES / 4);
            uint32_t *odd = even + TILE_BYTES / 4;
            for (int64_t n = h * group; n < (h + 1) * group; ++n) {
                const __m512 weights = _mm512_maskz_loadu_ps(lanes_below(count), s->scores + n * r->len + first);
                const __m512i low = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(weights));
                _mm512_storeu_si512(even + n * 16, low);
                _mm512_storeu_si512(odd + n * 16, _mm512_slli_epi32(low, 16));
            }
            _tile_loadd(4, even, 64);
            _tile_loadd(5, odd, 64);
            _tile_loadd(6, values + h * 128, (int64_t)r->row_bytes);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 5, 6);
            _tile_loadd(6, values + h * 128 + 64, (int64_t)r->row_bytes);
            _tile_dpbf16ps(2, 4, 6);
            _tile_dpbf16ps(3, 5, 6);
        }
    })
    /* Even and odd dims interleaved back into dimension order. */
    const __m512i low_half = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i high_half = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int c = 0; c < 2; ++c) {
        float *even = x->sums, *odd = x->sums + TILE_BYTES / 4;
        if (c == 0) {
            _tile_stored(0, even, 64);
            _tile_stored(1, odd, 64);
        } else {
            _tile_stored(2, even, 64);
            _tile_stored(3, odd, 64);
        }
        for (int64_t n = 0; n < a->num_heads; ++n) {
            const __m512 e = _mm512_loadu_ps(even + n * 16), o = _mm512_loadu_ps(odd + n * 16);
            _mm512_storeu_ps(s->head_acc + n * 64 + c * 32, _mm512_permutex2var_ps(e, low_half, o));
            _mm512_storeu_ps(s->head_acc + n * 64 + c * 32 + 16, _mm512_permutex2var_ps(e, high_half, o));
        }
    }
}

static void amx_attend_sequence(const DecodeArgs *a, const Scratch *s, const AmxScratch *x, int64_t seq) {
    const SequenceRows rows = sequence_rows(a, seq);
    amx_query_tiles(a, x, (const uint16_t *)a->q + seq * a->q_row_stride);
    amx_key_scores(a, s, x, &rows);
    float sums[a->num_heads];
    softmax_weights(s->scores, rows.len, a->num_heads, sums);
    amx_weighted_values(a, s, x, &rows);
    for (int64_t head = 0; head < a->num_heads; ++head)
        store_row(a->out + (size_t)((seq * a->num_heads + head) * 64) * element_size(a->dtype), a->dtype, 64,
                  s->head_acc + head * 64, 1.0f / sums[head]);
}
#else
#define AMX_PATH 0
#endif

/* The whole-sequence items apply: the bfloat16-pairs path at this build's shape. */
static int sequence_path(const DecodeArgs *a) {
    return a->dtype == DTYPE_BFLOAT16 && (a->cache_dtype == DTYPE_BFLOAT16 || is_float8(a->cache_dtype)) &&
           vector_path(a->head_dim, a->num_heads / a->num_kv_heads);
}
#else
#define SEQUENCE_PATH 0
#define AMX_PATH 0
static int sequence_path(const DecodeArgs *a) {
    (void)a;
    return 0;
}
static void attend_sequence(const DecodeArgs *a, const Scratch *s, int64_t seq) { (void)a, (void)s, (void)seq; }
#endif

/* 1 where a bfloat16 call of this build with these heads and blocks takes the AMX path (a whole sequence
 * per item, multiplied on tiles), else 0. */
int hawker_paged_decode_attention_tiles(int64_t num_heads, int64_t num_kv_heads, int64_t block_size, int cache_dtype) {
#if AMX_PATH
    const DecodeArgs args = {.num_heads = num_heads, .num_kv_heads = num_kv_heads, .head_dim = HAWKER_HEAD_DIM,
                             .block_size = block_size, .dtype = DTYPE_BFLOAT16, .cache_dtype = cache_dtype};
    return sequence_path(&args) && amx_path(&args) && amx_permitted();
#else
    (void)num_heads, (void)num_kv_heads, (void)block_size, (void)cache_dtype;
    return 0;
#endif
}

/*
 * q: queries, sequence `i` head `h` at q[i * q_row_stride + h * head_dim];
 * k_cache, v_cache: [blocks, block_size, num_kv_heads, head_dim] of cache_dtype (dtype or an 8-bit float);
 * out: [num_seqs, num_heads, head_dim], contiguous;
 * block_tables: [num_seqs, table_stride]; context_lens: [num_seqs], each >= 1.
 * Returns 0, or -1 if scratch memory could not be allocated.
 */
int hawker_paged_decode_attention(const void *q, const void *k_cache, const void *v_cache, void *out,
                                  const int64_t *block_tables, const int64_t *context_lens, int64_t num_seqs,
                                  int64_t table_stride, int64_t q_row_stride, int64_t num_heads,
                                  int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale, int dtype,
                                  int cache_dtype, int num_threads) {
    const DecodeArgs args = {q,         k_cache,      v_cache,      out,      block_tables, context_lens, table_stride,
                             q_row_stride, num_heads, num_kv_heads, head_dim, block_size,   scale,        dtype,
                             cache_dtype};
    int64_t max_len = 1;
    for (int64_t i = 0; i < num_seqs; ++i) max_len = context_lens[i] > max_len ? context_lens[i] : max_len;
    const int whole_sequences = sequence_path(&args);
    /* Heads scored at once by an item: all of them for whole sequences, one KV head's group otherwise. */
    const int64_t group = num_heads / num_kv_heads, item_heads = whole_sequences ? num_heads : group;
    const int64_t items = whole_sequences ? num_seqs : num_seqs * num_kv_heads;
#if AMX_PATH
    const int amx = whole_sequences && amx_path(&args) && amx_permitted();
#endif
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        const int64_t rows = head_dim;
        /* widened: 16 rows of bfloat16, i.e. 8 rows' worth of floats */
        const int64_t floats = 2 * group * head_dim + rows + item_heads * max_len + 8 * head_dim +
                               (whole_sequences ? num_heads * head_dim : 0);
        float *memory = malloc((size_t)floats * sizeof(float));
        float *scores = memory + 2 * group * head_dim + rows;
        float *widened = scores + item_heads * max_len;
        const Scratch scratch = {memory, memory + group * head_dim, memory + 2 * group * head_dim, scores,
                                 (uint16_t *)widened, widened + 8 * head_dim};
#if AMX_PATH
        char *amx_memory = amx ? aligned_alloc(64, (amx_scratch_bytes(&args) + 63) / 64 * 64) : NULL;
        AmxScratch amx_scratch_ = {0};
        if (amx_memory) {
            amx_scratch_ = amx_scratch(&args, amx_memory);
            amx_configure_tiles(); /* a thread's tile registers are its own */
        }
        const int ready = memory != NULL && (!amx || amx_memory != NULL);
#else
        const int ready = memory != NULL;
#endif
        /* Every thread must reach the work-sharing loop, so a failed allocation only marks its items. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; ++item) {
            if (!ready)
                failed = 1;
#if AMX_PATH
            else if (amx)
                amx_attend_sequence(&args, &scratch, &amx_scratch_, item);
#endif
            else if (whole_sequences)
                attend_sequence(&args, &scratch, item);
            else
                attend_one(&args, &scratch, item / num_kv_heads, item % num_kv_heads);
        }
#if AMX_PATH
        if (amx_memory) _tile_release();
        free(amx_memory);
#endif
        free(memory);
    }
    return failed ? -1 : 0;
}
