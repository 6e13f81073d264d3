/*
 * The CPU kernel of the torch operator hawker::paged_decode_attention, in C++: the dispatcher calls it
 * directly. Registered from Python instead, a call costs ~21 us on this 2-core machine (the dispatcher
 * boxing its arguments into Python, the wrapper's checks, ctypes) against a kernel of ~6 us at one
 * sequence of 100 positions; a one-row decode step makes one call a layer (benchmarks/NOTES.md).
 *
 * The C kernel (csrc/paged_decode_attention.c) is built once per shape of heads (query heads per KV
 * head, head size: compile-time constants of its vector loops), so this file cannot link one build.
 * Python builds each shape it meets and hands its entry point to
 * hawker_register_paged_decode_attention; the operator looks the shape of its arguments up there.
 * The schema and the fake are defined from Python (hawker/kernels/cpu_decode_attention.py), which
 * falls back to its own ctypes kernel where this file cannot be built.
 */
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

namespace {

using DecodeKernel = int (*)(const void *q, const void *k_cache, const void *v_cache, void *out,
                             const int64_t *block_tables, const int64_t *context_lens, int64_t num_seqs,
                             int64_t table_stride, int64_t q_row_stride, int64_t num_heads, int64_t num_kv_heads,
                             int64_t head_dim, int64_t block_size, float scale, int dtype, int cache_dtype,
                             int num_threads);

// The builds Python has registered, by (query heads per KV head, head size).
class KernelRegistry {
   public:
    void add(int64_t group, int64_t head_dim, DecodeKernel kernel) {
        const std::lock_guard<std::mutex> lock(mutex_);
        kernels_[{group, head_dim}] = kernel;
    }
    DecodeKernel find(int64_t group, int64_t head_dim) {
        const std::lock_guard<std::mutex> lock(mutex_);
        const auto found = kernels_.find({group, head_dim});
        return found == kernels_.end() ? nullptr : found->second;
    }

   private:
    std::mutex mutex_;
    std::map<std::pair<int64_t, int64_t>, DecodeKernel> kernels_;
};

KernelRegistry &registry() {
    static KernelRegistry instance;
    return instance;
}

// The dtype codes of csrc/attention_common.h.
int dtype_code(at::ScalarType dtype) {
    switch (dtype) {
        case at::kFloat: return 0;
        case at::kBFloat16: return 1;
        case at::kHalf: return 2;
        default: TORCH_CHECK_VALUE(false, "paged decode attention takes float32, bfloat16 or float16, got ", dtype);
    }
}

// The cache's code: the queries' dtype, or an 8-bit float (kv_cache_dtype).
int cache_dtype_code(at::ScalarType cache, at::ScalarType queries) {
    if (cache == at::kFloat8_e4m3fn) return 3;
    if (cache == at::kFloat8_e5m2) return 4;
    TORCH_CHECK_VALUE(cache == queries, "queries are ", queries, " but the cache is ", cache);
    return dtype_code(queries);
}

at::Tensor paged_decode_attention(const at::Tensor &q, const at::Tensor &k_cache, const at::Tensor &v_cache,
                                  const at::Tensor &block_tables, const at::Tensor &context_lens, double scale) {
    TORCH_CHECK_VALUE(q.dim() == 3, "queries must be [sequences, heads, dims], got ", q.sizes());
    TORCH_CHECK_VALUE(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
                      "caches must be [blocks, block_size, kv_heads, dims] of one shape");
    TORCH_CHECK_VALUE(k_cache.is_contiguous() && v_cache.is_contiguous(), "the KV cache must be contiguous");
    TORCH_CHECK_VALUE(v_cache.scalar_type() == k_cache.scalar_type(), "the key and value caches differ in dtype");
    const int cache_dtype = cache_dtype_code(k_cache.scalar_type(), q.scalar_type());
    const int64_t seqs = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = k_cache.size(2);
    TORCH_CHECK_VALUE(k_cache.size(3) == dim && heads % kv_heads == 0, "queries ", q.sizes(),
                      " do not match the cache ", k_cache.sizes());
    TORCH_CHECK_VALUE(block_tables.dim() == 2 && block_tables.size(0) == seqs && context_lens.dim() == 1 &&
                          context_lens.size(0) == seqs,
                      "block_tables must be [sequences, width] and context_lens [sequences]");
    const DecodeKernel kernel = registry().find(heads / kv_heads, dim);
    TORCH_CHECK(kernel != nullptr, "no paged decode attention kernel registered for ", heads / kv_heads,
                " query heads a KV head of ", dim, " dims");
    // Sequences may be strided (a slice of a wider projection); heads and dims must be dense.
    const at::Tensor rows = q.stride(2) == 1 && q.stride(1) == dim ? q : q.contiguous();
    const at::Tensor tables = block_tables.to(at::kLong).contiguous();
    const at::Tensor lens = context_lens.to(at::kLong).contiguous();
    at::Tensor out = at::empty({seqs, heads, dim}, q.options());
    if (seqs == 0) return out;
    const int status =
        kernel(rows.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), tables.data_ptr<int64_t>(),
               lens.data_ptr<int64_t>(), seqs, tables.size(1), rows.stride(0), heads, kv_heads, dim, k_cache.size(1),
               static_cast<float>(scale), dtype_code(q.scalar_type()), cache_dtype, at::get_num_threads());
    TORCH_CHECK(status == 0, "paged decode attention could not allocate its scratch memory");
    return out;
}

}  // namespace

extern "C" void hawker_register_paged_decode_attention(int64_t group, int64_t head_dim, void *kernel) {
    registry().add(group, head_dim, reinterpret_cast<DecodeKernel>(kernel));
}

TORCH_LIBRARY_IMPL(hawker, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
