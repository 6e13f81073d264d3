/*
 * The CPU kernel of the torch operator hawker::int8_dot_linear, in C++: the dispatcher calls it
 * directly. The same kernel registered from Python costs ~14 us a call on this 2-core machine
 * (the dispatcher boxing its arguments into Python, the wrapper's checks, ctypes); this one ~6 us.
 * A one-row decode step makes 120 such calls (benchmarks/NOTES.md).
 *
 * It only checks its arguments and calls hawker_int8_dot_linear (csrc/int8_dot_linear.c, linked in
 * at build time); the schema and the fake are defined from Python (hawker/kernels/int8_dot_linear.py),
 * which builds this file with torch's headers (hawker/kernels/native.py, ~7 s once per machine) and
 * falls back to its own ctypes kernel where it cannot.
 */
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>

extern "C" int hawker_int8_dot_linear(const void *x, int64_t x_stride, const uint8_t *packed, int bits, void *out,
                                      int64_t out_stride, int64_t rows, int64_t in_features, int64_t out_features,
                                      int dtype, int threads);

namespace {

constexpr int64_t kGroup = 32;  // inputs that share a scale and offset (csrc/int8_dot_linear.c)

at::Tensor int8_dot_linear(const at::Tensor &x, const at::Tensor &packed, int64_t bits, c10::SymInt out_features_sym) {
    const int64_t out_features = out_features_sym.expect_int();
    TORCH_CHECK_VALUE(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
                "expected 2-D float32 or bfloat16 rows, got ", x.scalar_type(), " ", x.sizes());
    TORCH_CHECK_VALUE(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
                "packed weights must be contiguous uint8 [panels, groups, block]");
    const int64_t in_features = packed.size(1) * kGroup;
    TORCH_CHECK_VALUE(x.size(1) == in_features, "rows have ", x.size(1), " inputs, the weight takes ", in_features);
    const at::Tensor rows = x.stride(1) == 1 ? x : x.contiguous();
    at::Tensor out = at::empty({rows.size(0), out_features}, rows.options());
    if (rows.size(0) == 0) return out;
    const int status = hawker_int8_dot_linear(
        rows.data_ptr(), rows.stride(0), static_cast<const uint8_t *>(packed.data_ptr()), static_cast<int>(bits),
        out.data_ptr(), out_features, rows.size(0), in_features, out_features,
        rows.scalar_type() == at::kBFloat16 ? 1 : 0, at::get_num_threads());
    TORCH_CHECK(status == 0, "int8 dot linear kernel failed (", status, ")");
    return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hawker, CPU, m) { m.impl("int8_dot_linear", &int8_dot_linear); }
