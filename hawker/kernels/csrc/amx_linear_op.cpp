/*
 * The CPU kernels of the torch operators hawker::amx_linear and hawker::amx_q4_linear, in C++: the dispatcher
 * calls them directly, not through Python (as for hawker::int8_dot_linear, ~6 against ~14 us a call); a
 * compiled decode step makes 121 such calls with the default model.
 *
 * They only check their arguments and call hawker_amx_linear or hawker_amx_q4_linear (csrc/amx_linear.c,
 * linked in at build time); the schemas and the fakes are defined from Python (hawker/kernels/amx_linear.py),
 * which builds this file with torch's headers (hawker/kernels/native.py) and falls back to its own ctypes
 * kernels where it cannot.
 */
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>

extern "C" int hawker_amx_linear(const uint16_t *x, int64_t x_stride, const uint16_t *packed, uint16_t *out,
                                 int64_t out_stride, int64_t rows, int64_t in_features, int64_t out_features,
                                 int threads);
extern "C" int hawker_amx_q4_linear(const uint16_t *x, int64_t x_stride, const uint8_t *q4, uint16_t *out,
                                    int64_t out_stride, int64_t rows, int64_t in_features, int64_t out_features,
                                    int threads);

namespace {

constexpr int64_t kQ4StepBytes = 640;  // csrc/amx_linear.c's Q4_STEP_BYTES: 512 bytes of codes, 64 of scales, 64 of offsets

// The rows' inputs checked against the weight's, a [rows, out_features] product and `kernel`'s call on them.
template <typename Weight, typename Kernel>
at::Tensor product(const at::Tensor &x, const at::Tensor &packed, int64_t in_features, int64_t out_features,
                   Kernel kernel) {
    TORCH_CHECK_VALUE(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "expected 2-D bfloat16 rows, got ",
                      x.scalar_type(), " ", x.sizes());
    TORCH_CHECK_VALUE(x.size(1) == in_features, "rows have ", x.size(1), " inputs, the weight takes ", in_features);
    const at::Tensor rows = x.stride(1) == 1 ? x : x.contiguous();
    at::Tensor out = at::empty({rows.size(0), out_features}, rows.options());
    if (rows.size(0) == 0) return out;
    const int status = kernel(static_cast<const uint16_t *>(rows.data_ptr()), rows.stride(0),
                              static_cast<const Weight *>(packed.data_ptr()), static_cast<uint16_t *>(out.data_ptr()),
                              out_features, rows.size(0), in_features, out_features, at::get_num_threads());
    TORCH_CHECK(status == 0, "AMX linear kernel failed (", status, ")");
    return out;
}

at::Tensor amx_linear(const at::Tensor &x, const at::Tensor &packed, c10::SymInt out_features_sym) {
    TORCH_CHECK_VALUE(packed.dim() == 4 && packed.scalar_type() == at::kBFloat16 && packed.is_contiguous(),
                      "packed weights must be contiguous bfloat16 [panels, in / 2, 32, 2]");
    return product<uint16_t>(x, packed, packed.size(1) * 2, out_features_sym.expect_int(), hawker_amx_linear);
}

at::Tensor amx_q4_linear(const at::Tensor &x, const at::Tensor &packed, c10::SymInt out_features_sym) {
    const int64_t out_features = out_features_sym.expect_int();
    TORCH_CHECK_VALUE(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                          packed.size(2) == kQ4StepBytes && packed.size(0) * 32 >= out_features,
                      "4-bit panels must be contiguous uint8 [panels, in / 32, 640]");
    return product<uint8_t>(x, packed, packed.size(1) * 32, out_features, hawker_amx_q4_linear);
}

}  // namespace

TORCH_LIBRARY_IMPL(hawker, CPU, m) {
    m.impl("amx_linear", &amx_linear);
    m.impl("amx_q4_linear", &amx_q4_linear);
}
