/*
 * Sampling of logit rows (CPU): penalties, temperature, top-k, top-p and min-p, then one draw a row, in a
 * few passes over each row and no sort.
 *
 * The torch sampler (hawker/engine/sampler.py) sorts a row whenever its kept set does not end among its 256
 * largest logits: a flat distribution (random-token prompts at temperature 0.8 keep ~5,600 of the default
 * model's 49,152 tokens under top-p 0.95) costs ~1.5 ms a row that way, and even plain temperature sampling
 * runs a float64 cumulative sum over every row (benchmarks/NOTES.md, session 22). Here a row's kept set is
 * found by a radix select: a histogram of counts and weight over the weights' float bits (of the tokens
 * above a floor the boundary cannot lie under), then, among the tokens of the one bin where the boundary
 * lies, the logits as order-preserving 32-bit keys 12, 12 and 8 bits at a time;
 * equal logits are ordered by token id. The same definitions as the torch sampler's:
 *  - top-k keeps the k largest logits;
 *  - top-p keeps the smallest prefix of those, by falling logit, whose probability (renormalised over the
 *    top-k set) reaches top_p, the first token always;
 *  - min-p drops a kept token whose probability is under min_p times the largest;
 *  - the draw is the inverse CDF, in token order, of the kept tokens' probabilities at one uniform number
 *    in [0, 1) a row (the sampler's generator makes it, so seeds mean what they meant).
 * Penalties, where given, first change a copy of the row as hawker/engine/sampler.py's torch code does,
 * rounding for rounding: a token anywhere in the row's history (prompt and output) has a positive logit
 * divided by the repetition penalty and a negative one multiplied; then the frequency penalty times its
 * count among the outputs and the presence penalty if it is among them are subtracted.
 * Log-probabilities, where asked for, are of the distribution drawn from (or of the row as given, "raw"):
 * the drawn token's, its rank and the top n, for greedy rows (inverse temperature 0) too.
 * A row's result depends on that row alone. Sums run in another order than torch's, so a token at a
 * boundary (of top-p's mass, or of the draw) can come out differently within float rounding.
 *
 * Built at run time by hawker/kernels/native.py (-O3 -march=native -fopenmp): AVX-512 loops where the CPU
 * has them, the same steps in portable C elsewhere.
 */
#include "attention_common.h"

#define W_SHIFT 18     /* a weight's bin: its float bits above these (w <= 1: under 4,096 bins, ~3 % wide) */
#define LEVEL_BINS 4096 /* bins of a level: the weights', then 12, 12 and 8 bits of the logits' keys */

typedef struct {
    float inverse_temperature;
    int64_t top_k; /* >= vocab: off */
    float top_p;   /* >= 1: off */
    float min_p;   /* <= 0: off */
} RowParams;

/* A level's histogram: how many tokens and how much weight fall in each bin (8 bytes a bin, so that the
 * 4,096 bins stay in L1 while the row streams past). */
typedef struct {
    int32_t count;
    float mass;
} Bin;

/* A thread's scratch: one row's keys and weights, the weights' histogram, a level's, a bin's tokens; for
 * penalties, the row's changed logits and each token's marks (zero between rows). */
typedef struct {
    float *penalised;
    int32_t *marks;
    uint32_t *keys;
    float *weights;
    int32_t *candidates;
    Bin *by_weight;
    Bin *level;
} Scratch;

/* A token's place in a row's order, largest logit first, equal logits by token id: (key, index). */
typedef struct {
    uint32_t key;
    int64_t index;
} Boundary;

/* Token i's logit of a float32 or bfloat16 row. */
static inline float row_value_of(const void *row, int dtype, int64_t i) {
    return dtype == DTYPE_BFLOAT16 ? bf16_to_float(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

static inline uint32_t weight_bin(float weight) {
    uint32_t bits;
    memcpy(&bits, &weight, sizeof bits);
    return bits >> W_SHIFT;
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* 16 logits from token i on (float32 or bfloat16), -0 made +0 (so equal floats get equal keys). */
static inline __m512 load16_logits(const void *row, int dtype, int64_t i, __mmask16 lanes) {
    if (dtype == DTYPE_BFLOAT16) {
        const __m256i half = _mm256_maskz_loadu_epi16(lanes, (const uint16_t *)row + i);
        return _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16)),
                             _mm512_setzero_ps());
    }
    return _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, (const float *)row + i), _mm512_setzero_ps());
}

/* Larger floats map to larger unsigned keys: flip the sign bit of a positive, every bit of a negative. */
static inline __m512i order_keys16(__m512 values) {
    const __m512i bits = _mm512_castps_si512(values);
    return _mm512_xor_si512(bits, _mm512_or_si512(_mm512_srai_epi32(bits, 31), _mm512_set1_epi32((int)0x80000000u)));
}

/* Keys of the row; returns its largest value, or NaN where a value is NaN or the largest is infinite. */
static float load_keys(const void *row, int dtype, int64_t vocab, uint32_t *keys) {
    __m512 top = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    for (int64_t i = 0; i < vocab; i += 16) {
        const __mmask16 lanes = lanes_below(vocab - i);
        const __m512 values = load16_logits(row, dtype, i, lanes);
        nan |= _mm512_mask_cmp_ps_mask(lanes, values, values, _CMP_UNORD_Q);
        top = _mm512_mask_max_ps(top, lanes, top, values);
        _mm512_mask_storeu_epi32(keys + i, lanes, order_keys16(values));
    }
    const float largest = _mm512_reduce_max_ps(top);
    return nan || isinf(largest) ? NAN : largest;
}

/* weights[i] = exp((x_i - top) / temperature), 0 for a logit of -inf; returns their sum. */
static double exp_weights(const void *row, int dtype, int64_t vocab, float top, float inverse_temperature,
                          float *weights) {
    const __m512 shift = _mm512_set1_ps(top), scale = _mm512_set1_ps(inverse_temperature);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < vocab; i += 16) {
        const __mmask16 lanes = lanes_below(vocab - i);
        const __m512 values = load16_logits(row, dtype, i, lanes);
        const __mmask16 finite = _mm512_mask_cmp_ps_mask(lanes, values, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
        const __m512 w = _mm512_maskz_mov_ps(finite, exp16_nonpositive(_mm512_mul_ps(_mm512_sub_ps(values, shift), scale)));
        _mm512_mask_storeu_ps(weights + i, lanes, w);
        sum = _mm512_add_ps(sum, w);
    }
    return _mm512_reduce_add_ps(sum);
}

/* The tokens whose weight falls in `bin`, in token order, into out; returns how many. */
static int64_t tokens_in_bin(const float *weights, int64_t vocab, uint32_t bin, int32_t *out) {
    const __m512i wanted = _mm512_set1_epi32((int)bin);
    __m512i index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int64_t found = 0;
    for (int64_t i = 0; i < vocab; i += 16) {
        const __mmask16 lanes = lanes_below(vocab - i);
        const __m512i bins = _mm512_srli_epi32(_mm512_castps_si512(_mm512_maskz_loadu_ps(lanes, weights + i)), W_SHIFT);
        const __mmask16 hit = _mm512_mask_cmpeq_epi32_mask(lanes, bins, wanted);
        _mm512_mask_compressstoreu_epi32(out + found, hit, index);
        found += __builtin_popcount(hit);
        index = _mm512_add_epi32(index, _mm512_set1_epi32(16));
    }
    return found;
}

/* The tokens whose weight is at least `floor`, in token order, into out; returns how many. */
static int64_t tokens_at_least(const float *weights, int64_t vocab, float floor, int32_t *out) {
    __m512i index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int64_t found = 0;
    for (int64_t i = 0; i < vocab; i += 16) {
        const __mmask16 lanes = lanes_below(vocab - i);
        const __mmask16 hit =
            _mm512_mask_cmp_ps_mask(lanes, _mm512_maskz_loadu_ps(lanes, weights + i), _mm512_set1_ps(floor), _CMP_GE_OQ);
        _mm512_mask_compressstoreu_epi32(out + found, hit, index);
        found += __builtin_popcount(hit);
        index = _mm512_add_epi32(index, _mm512_set1_epi32(16));
    }
    return found;
}

/* Zero the weights of tokens after `last` in the row's order, and those under min_weight. */
static void drop_after(const uint32_t *keys, float *weights, int64_t vocab, int cut, Boundary last, float min_weight) {
    const __m512i last_key = _mm512_set1_epi32((int)last.key), last_index = _mm512_set1_epi32((int)last.index);
    __m512i index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t i = 0; i < vocab; i += 16) {
        const __mmask16 lanes = lanes_below(vocab - i);
        const __m512 w = _mm512_maskz_loadu_ps(lanes, weights + i);
        __mmask16 kept = _mm512_cmp_ps_mask(w, _mm512_set1_ps(min_weight), _CMP_GE_OQ);
        if (cut) {
            const __m512i key = _mm512_maskz_loadu_epi32(lanes, keys + i);
            kept &= _mm512_cmpgt_epu32_mask(key, last_key) |
                    (_mm512_cmpeq_epi32_mask(key, last_key) & _mm512_cmple_epi32_mask(index, last_index));
        }
        _mm512_mask_storeu_ps(weights + i, lanes, _mm512_maskz_mov_ps(kept, w));
        index = _mm512_add_epi32(index, _mm512_set1_epi32(16));
    }
}

static float sum_weights(const float *weights, int64_t count) {
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < count; i += 16) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(lanes_below(count - i), weights + i));
    return _mm512_reduce_add_ps(sum);
}
#else
static inline uint32_t order_key(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

static inline float row_value(const void *row, int dtype, int64_t i) {
    return row_value_of(row, dtype, i) + 0.0f; /* -0 + 0 is +0 */
}

static float load_keys(const void *row, int dtype, int64_t vocab, uint32_t *keys) {
    float top = -INFINITY;
    int nan = 0;
    for (int64_t i = 0; i < vocab; ++i) {
        const float value = row_value(row, dtype, i);
        nan |= value != value;
        top = value > top ? value : top;
        keys[i] = order_key(value);
    }
    return nan || isinf(top) ? NAN : top;
}

static double exp_weights(const void *row, int dtype, int64_t vocab, float top, float inverse_temperature,
                          float *weights) {
    double sum = 0.0;
    for (int64_t i = 0; i < vocab; ++i) {
        const float value = row_value(row, dtype, i);
        weights[i] = value == -INFINITY ? 0.0f : exp_nonpositive((value - top) * inverse_temperature);
        sum += weights[i];
    }
    return sum;
}

static int64_t tokens_in_bin(const float *weights, int64_t vocab, uint32_t bin, int32_t *out) {
    int64_t found = 0;
    for (int64_t i = 0; i < vocab; ++i)
        if (weight_bin(weights[i]) == bin) out[found++] = (int32_t)i;
    return found;
}

static int64_t tokens_at_least(const float *weights, int64_t vocab, float floor, int32_t *out) {
    int64_t found = 0;
    for (int64_t i = 0; i < vocab; ++i) {
        out[found] = (int32_t)i;
        found += weights[i] >= floor;
    }
    return found;
}

static void drop_after(const uint32_t *keys, float *weights, int64_t vocab, int cut, Boundary last, float min_weight) {
    for (int64_t i = 0; i < vocab; ++i) {
        const int after = cut && (keys[i] < last.key || (keys[i] == last.key && i > last.index));
        weights[i] = after || weights[i] < min_weight ? 0.0f : weights[i];
    }
}

static float sum_weights(const float *weights, int64_t count) {
    float sum = 0.0f;
    for (int64_t i = 0; i < count; ++i) sum += weights[i];
    return sum;
}
#endif

static inline int precedes_or_is(uint32_t key, int64_t index, const Boundary *b) {
    return key > b->key || (key == b->key && index <= b->index);
}

/* What a search walks towards: the count-th token (top-k), or the first token whose running weight
 * reaches `mass` (top-p). */
typedef struct {
    int by_mass;
    int64_t count;
    double mass;
} Goal;

/* The walk so far: tokens and weight before the bin or token looked at. */
typedef struct {
    int64_t count;
    double mass;
} Walked;

static inline int reached(const Goal *goal, Walked before, int64_t count, double mass) {
    return goal->by_mass ? before.mass + mass >= goal->mass : before.count + count >= goal->count;
}

/* From the top bin down, the bin in which the goal is reached (adding every bin above it to *walked), or -1. */
static int64_t walk_bins(const Bin *histogram, int64_t bins, const Goal *goal, Walked *walked) {
    for (int64_t bin = bins - 1; bin >= 0; --bin) {
        if (reached(goal, *walked, histogram[bin].count, histogram[bin].mass)) return bin;
        walked->count += histogram[bin].count;
        walked->mass += histogram[bin].mass;
    }
    return -1;
}

/* The histogram of the weights from `floor` up (the searches never walk below it: see search_floor). */
static void weight_histogram(const Scratch *s, int64_t vocab, float floor) {
    memset(s->by_weight, 0, LEVEL_BINS * sizeof *s->by_weight);
    /* The tokens first, without a branch (whether a weight clears the floor is a coin toss to a predictor). */
    const int64_t heavy = tokens_at_least(s->weights, vocab, floor, s->candidates);
    for (int64_t j = 0; j < heavy; ++j) {
        const float weight = s->weights[s->candidates[j]];
        Bin *bin = &s->by_weight[weight_bin(weight)];
        bin->count += 1;
        bin->mass += weight;
    }
}

/*
 * The boundary token of `goal` (the last one kept), and in *kept_mass the weight up to and including it; 0
 * if the whole row does not reach the goal (float rounding). First the weight's bin (weight_histogram's) in
 * which the goal is reached: every token of a larger weight comes before it; then, among that bin's tokens,
 * the logits' keys 12, 12 and 8 bits at a time; then the tokens of that one key in token order.
 */
static int find_boundary(const Scratch *s, int64_t vocab, const Goal *goal, Boundary *boundary, double *kept_mass) {
    static const int shifts[3] = {20, 8, 0}, widths[3] = {12, 12, 8};
    Walked walked = {0, 0.0};
    const int64_t weight_bin_found = walk_bins(s->by_weight, LEVEL_BINS, goal, &walked);
    if (weight_bin_found < 0) return 0;
    const int64_t candidates = tokens_in_bin(s->weights, vocab, (uint32_t)weight_bin_found, s->candidates);
    uint32_t prefix = 0, prefix_mask = 0;
    for (int level = 0; level < 3; ++level) {
        const int shift = shifts[level];
        const int64_t bins = (int64_t)1 << widths[level];
        memset(s->level, 0, (size_t)bins * sizeof *s->level);
        for (int64_t j = 0; j < candidates; ++j) {
            const int32_t i = s->candidates[j];
            if ((s->keys[i] & prefix_mask) != prefix) continue;
            Bin *bin = &s->level[(s->keys[i] >> shift) & (uint32_t)(bins - 1)];
            bin->count += 1;
            bin->mass += s->weights[i];
        }
        const int64_t bin = walk_bins(s->level, bins, goal, &walked);
        if (bin < 0) return 0;
        prefix |= (uint32_t)bin << shift;
        prefix_mask |= (uint32_t)(bins - 1) << shift;
    }
    /* The candidates of this key all hold one logit value: token order decides. */
    for (int64_t j = 0; j < candidates; ++j) {
        const int32_t i = s->candidates[j];
        if (s->keys[i] != prefix) continue;
        if (reached(goal, walked, 1, s->weights[i])) {
            boundary->key = prefix;
            boundary->index = i;
            *kept_mass = walked.mass + s->weights[i];
            return 1;
        }
        walked.count += 1;
        walked.mass += s->weights[i];
    }
    return 0;
}

static int64_t count_at_least(const float *weights, int64_t vocab, float floor) {
    int64_t count = 0;
    for (int64_t i = 0; i < vocab; ++i) count += weights[i] >= floor;
    return count;
}

/*
 * A weight the searches' boundaries lie at or above, so that the histogram can leave out the many tokens
 * under it (most of a row). Top-k: the largest of a few powers of two with at least k tokens at or above
 * it (the top-p boundary then lies inside the top-k set too). Top-p alone: the tokens under
 * (1 - top_p) total / (2 vocab) weigh under (1 - top_p) / 2 of the total, so the tokens above it reach top_p.
 */
static float search_floor(const float *weights, int64_t vocab, const RowParams *p, double total) {
    if (p->top_k < vocab) {
        for (int exponent = 4; exponent <= 64; exponent *= 2) {
            const float floor = ldexpf(1.0f, -exponent);
            if (count_at_least(weights, vocab, floor) >= p->top_k) return floor;
        }
        return 0.0f;
    }
    return (float)((1.0 - (double)p->top_p) * total / (2.0 * (double)vocab));
}

/* Zero the weights of the tokens top-k, top-p and min-p drop; `total` is every weight's sum. */
static void filter(const Scratch *s, int64_t vocab, const RowParams *p, double total) {
    Boundary last = {0, -1};
    int cut = 0;
    double top_k_mass = total;
    if (p->top_k < vocab || p->top_p < 1.0f) weight_histogram(s, vocab, search_floor(s->weights, vocab, p, total));
    if (p->top_k < vocab) {
        const Goal goal = {0, p->top_k, 0.0};
        cut = find_boundary(s, vocab, &goal, &last, &top_k_mass);
    }
    if (p->top_p < 1.0f) {
        /* A token is kept while the weight before it is under top_p of the top-k set's: the first to reach
         * that is the last kept. */
        const Goal goal = {1, 0, (double)p->top_p * top_k_mass};
        Boundary by_mass;
        double unused;
        if (find_boundary(s, vocab, &goal, &by_mass, &unused) &&
            (!cut || precedes_or_is(by_mass.key, by_mass.index, &last))) {
            last = by_mass;
            cut = 1;
        }
    }
    /* min-p: the largest weight is exp(0) = 1. */
    drop_after(s->keys, s->weights, vocab, cut, last, p->min_p > 0.0f ? p->min_p : 0.0f);
}

#define DRAW_CHUNK 256

/* The inverse CDF at `uniform` of the (unnormalised) weights in token order, a token of zero weight never;
 * *kept_total: the weights' sum. */
static int64_t draw(const float *weights, int64_t vocab, double uniform, double *kept_total) {
    const int64_t chunks = (vocab + DRAW_CHUNK - 1) / DRAW_CHUNK;
    double sums[chunks];
    double total = 0.0;
    for (int64_t c = 0; c < chunks; ++c) {
        const int64_t first = c * DRAW_CHUNK;
        sums[c] = sum_weights(weights + first, vocab - first < DRAW_CHUNK ? vocab - first : DRAW_CHUNK);
        total += sums[c];
    }
    *kept_total = total;
    const double target = uniform * total;
    double running = 0.0;
    int64_t c = 0;
    while (c + 1 < chunks && running + sums[c] <= target) running += sums[c++];
    /* The target lies in chunk c (or, by rounding, a later one): token by token from there. */
    int64_t last_drawable = -1;
    for (int64_t i = c * DRAW_CHUNK; i < vocab; ++i) {
        if (weights[i] <= 0.0f) continue;
        running += weights[i];
        last_drawable = i;
        if (running > target) return i;
    }
    return last_drawable;
}

/* A row's history and penalties: tokens [0, length), the outputs from `prompt` on. */
typedef struct {
    const int32_t *tokens;
    int64_t length;
    int64_t prompt;
    float repetition, frequency, presence;
} History;

enum { SEEN = 1, APPLIED = 2, COUNT_STEP = 4 }; /* a token's marks: seen, penalised, outputs x COUNT_STEP */

/* The row with its penalties into s->penalised (float32). Separate roundings for each product and difference,
 * as the torch ops make them (no fused multiply-add). */
__attribute__((optimize("fp-contract=off"))) static void penalise(const Scratch *s, const void *row, int dtype,
                                                                 int64_t vocab, const History *h) {
    for (int64_t i = 0; i < vocab; ++i) s->penalised[i] = row_value_of(row, dtype, i);
    for (int64_t t = 0; t < h->length; ++t)
        if (h->tokens[t] >= 0 && h->tokens[t] < vocab)
            s->marks[h->tokens[t]] = (s->marks[h->tokens[t]] | SEEN) + (t >= h->prompt ? COUNT_STEP : 0);
    for (int64_t t = 0; t < h->length; ++t) {
        const int32_t token = h->tokens[t];
        if (token < 0 || token >= vocab || (s->marks[token] & APPLIED)) continue;
        const float outputs = (float)(s->marks[token] / COUNT_STEP);
        const float value = s->penalised[token];
        float changed = value > 0.0f ? value / h->repetition : value * h->repetition;
        changed = changed - h->frequency * outputs;
        changed = changed - h->presence * (outputs > 0.0f ? 1.0f : 0.0f);
        s->penalised[token] = changed;
        s->marks[token] |= APPLIED;
    }
    for (int64_t t = 0; t < h->length; ++t)
        if (h->tokens[t] >= 0 && h->tokens[t] < vocab) s->marks[h->tokens[t]] = 0;
}

/* Where a row's log-probabilities go (NULL chosen: none wanted): the drawn token's and its rank (1 = the most
 * likely), and the `top` most likely tokens' ids and log-probabilities, most likely first. */
typedef struct {
    float *chosen;
    int64_t *rank;
    int64_t *top_ids;
    float *top_values;
    int64_t top;
    int raw; /* of the row as given (temperature 1, no penalty, nothing cut) instead */
} LogprobsOut;

/*
 * The log-probabilities of the distribution the row was drawn from: (x - max) / T - log(sum of the kept
 * weights) for a kept token (weight > 0), -inf for the others. The top tokens are taken in the row's order
 * (largest logit first, equal ones by token id), which puts every kept token before every dropped one.
 */
/* (x_i - top) / T: a token's log-weight, the same float the weights were made from. */
static inline float log_weight(const void *row, int dtype, int64_t i, float top, float inverse_temperature) {
    return (row_value_of(row, dtype, i) - top) * inverse_temperature;
}

static void row_logprobs(const Scratch *s, const void *row, int dtype, int64_t vocab, float top,
                         float inverse_temperature, double kept_total, int64_t token, const LogprobsOut *out) {
    const double log_total = log(kept_total);
    const float chosen = log_weight(row, dtype, token, top, inverse_temperature);
    *out->chosen = (float)((double)chosen - log_total);
    int64_t above = 0;
    for (int64_t i = 0; i < vocab; ++i) above += s->weights[i] > 0.0f && log_weight(row, dtype, i, top, inverse_temperature) > chosen;
    *out->rank = above + 1;
    /* The best `top` by (key, -index), kept sorted; a token joins only if it beats the last. */
    int64_t filled = 0;
    for (int64_t i = 0; i < vocab && out->top > 0; ++i) {
        const uint32_t key = s->keys[i];
        if (filled == out->top && key <= s->keys[out->top_ids[filled - 1]]) continue;
        int64_t at = filled < out->top ? filled++ : filled - 1;
        while (at > 0 && s->keys[out->top_ids[at - 1]] < key) {
            out->top_ids[at] = out->top_ids[at - 1];
            --at;
        }
        out->top_ids[at] = i;
    }
    for (int64_t j = 0; j < filled; ++j) {
        const int64_t i = out->top_ids[j];
        out->top_values[j] = s->weights[i] > 0.0f ? (float)((double)log_weight(row, dtype, i, top, inverse_temperature) - log_total) : -INFINITY;
    }
}

/* The first token holding the row's largest logit (a greedy row's, as torch.max(dim=-1).indices). */
static int64_t first_largest(const void *row, int dtype, int64_t vocab, float top) {
    for (int64_t i = 0; i < vocab; ++i)
        if (row_value_of(row, dtype, i) == top) return i;
    return -1;
}

/* A row with an inverse temperature of 0 is greedy: its token is the first largest logit, and its
 * log-probabilities are those of the (penalised) logits at temperature 1, nothing cut. */
static int64_t sample_row(const Scratch *s, const void *row, int dtype, int64_t vocab, const RowParams *p,
                          const History *history, double uniform, const LogprobsOut *logprobs) {
    const void *given = row;
    const int given_dtype = dtype;
    if (history) {
        penalise(s, row, dtype, vocab, history);
        row = s->penalised;
        dtype = DTYPE_FLOAT32;
    }
    const float top = load_keys(row, dtype, vocab, s->keys);
    if (top != top) return -1;
    const int greedy = p->inverse_temperature <= 0.0f;
    const float inverse_temperature = greedy ? 1.0f : p->inverse_temperature;
    if (greedy && !logprobs) return first_largest(row, dtype, vocab, top);
    const double total = exp_weights(row, dtype, vocab, top, inverse_temperature, s->weights);
    if (!greedy && (p->top_k < vocab || p->top_p < 1.0f || p->min_p > 0.0f)) filter(s, vocab, p, total);
    double kept_total = total;
    const int64_t token = greedy ? first_largest(row, dtype, vocab, top) : draw(s->weights, vocab, uniform, &kept_total);
    if (logprobs && token >= 0 && logprobs->raw) {
        const float raw_top = load_keys(given, given_dtype, vocab, s->keys);
        const double raw_total = exp_weights(given, given_dtype, vocab, raw_top, 1.0f, s->weights);
        row_logprobs(s, given, given_dtype, vocab, raw_top, 1.0f, raw_total, token, logprobs);
    } else if (logprobs && token >= 0) {
        row_logprobs(s, row, dtype, vocab, top, inverse_temperature, kept_total, token, logprobs);
    }
    return token;
}

/* 1: every build runs (the vector loops where the CPU has AVX-512, portable loops elsewhere). */
int hawker_sampling_built(void) { return 1; }

/*
 * logits: [rows, vocab] float32 or bfloat16 (dtype), rows `stride` elements apart; per row its inverse
 * temperature (> 0; 0 for a greedy row), top_k (>= vocab for none), top_p (1 for none), min_p (0 for none) and a uniform number
 * in [0, 1); out[r]: the token drawn, or -1 where row r holds NaN or an infinite largest logit. Penalties:
 * history NULL for none, else row r's tokens are history[history_starts[r] .. history_starts[r + 1]) (ids
 * below vocab), its outputs from prompt_lengths[r] on, with its repetition, frequency and presence penalties.
 * Log-probabilities (chosen_logprobs NULL for none): per row the drawn token's, its rank, and the top_n most likely
 * tokens' ids and log-probabilities ([rows, top_n] each), of the distribution it was drawn from, or where
 * raw_logprobs[r] is 1 of the row as given (temperature 1, no penalty, nothing cut).
 * Returns 1 if any row was -1 or scratch could not be allocated (the caller then samples another way), else 0.
 */
int hawker_sampling(const void *logits, int dtype, int64_t stride, int64_t rows, int64_t vocab,
                       const float *inverse_temperatures, const int64_t *top_ks, const float *top_ps,
                       const float *min_ps, const double *uniforms, const int32_t *history,
                       const int64_t *history_starts, const int64_t *prompt_lengths, const float *repetition,
                       const float *frequency, const float *presence, int64_t *out, float *chosen_logprobs,
                       int64_t *chosen_ranks, int64_t *top_ids, float *top_logprobs, int64_t top_n,
                       const uint8_t *raw_logprobs, int threads) {
    int failed = 0;
    const size_t element = element_size(dtype);
#pragma omp parallel num_threads(threads) reduction(| : failed) if (rows > 1)
    {
        const size_t histogram = LEVEL_BINS * sizeof(Bin), per_token = history ? 5 : 3;
        char *memory = malloc(2 * histogram + (size_t)vocab * per_token * 4);
        Scratch s = {0};
        if (memory) {
            s.by_weight = (Bin *)memory;
            s.level = (Bin *)(memory + histogram);
            s.keys = (uint32_t *)(memory + 2 * histogram);
            s.weights = (float *)(s.keys + vocab);
            s.candidates = (int32_t *)(s.weights + vocab);
            if (history) {
                s.penalised = (float *)(s.candidates + vocab);
                s.marks = (int32_t *)(s.penalised + vocab);
                memset(s.marks, 0, (size_t)vocab * sizeof *s.marks);
            }
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < rows; ++r) {
            const RowParams p = {inverse_temperatures[r], top_ks[r], top_ps[r], min_ps[r]};
            const History h = history ? (History){history + history_starts[r], history_starts[r + 1] - history_starts[r],
                                                  prompt_lengths[r], repetition[r], frequency[r], presence[r]}
                                      : (History){0};
            LogprobsOut lp = {0};
            if (chosen_logprobs)
                lp = (LogprobsOut){chosen_logprobs + r, chosen_ranks + r, top_ids + r * top_n, top_logprobs + r * top_n,
                                   top_n, raw_logprobs[r]};
            out[r] = memory ? sample_row(&s, (const char *)logits + (size_t)(r * stride) * element, dtype, vocab, &p,
                                         history ? &h : NULL, uniforms[r], chosen_logprobs ? &lp : NULL)
                            : -1;
            failed |= out[r] < 0;
        }
        free(memory);
    }
    return failed;
}
