"""oneDNN's CPU linear with the weight reordered once into its blocked layout.

``F.linear`` on a CPU hands oneDNN a plain [out, in] weight, which oneDNN
reorders into its own blocked layout on every call; for the few rows of a
decode step that reorder costs more than the product (the default model's
[3072, 576] projection at 16 rows: 230 us through ``F.linear``, 100 us
prepacked; at 1,024 rows the two are equal; benchmarks/NOTES.md). Reordering
once at load time removes it. The result is oneDNN's own kernel on the same
data, so its bits are those of ``F.linear`` wherever both pick the same
algorithm (measured, not assumed: hawker/layers/matmul_plan.py).

Inside a ``torch.compile``'d step the call goes through the operator
``hawker::packed_linear`` (a plain one: ``torch.library.custom_op``'s checks
cost ~17 us a call): inductor's own lowering of oneDNN's linear accepts only
weights frozen into the graph as constants, and Hawker's weights change in
place (weight updates) while its compiled graphs live on.
"""

from __future__ import annotations

import functools

import torch

from hawker.kernels.native import define_cpu_op


@functools.cache
def available(dtype: torch.dtype) -> bool:
    """oneDNN can prepack and multiply ``dtype`` weights on this CPU (float16 needs AVX512-FP16 or AVX-NE-CONVERT)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        packed = pack(torch.ones(8, 8, dtype=dtype))
        _oneDNN_linear(torch.ones(1, 8, dtype=dtype), packed)
    except RuntimeError:
        return False
    return True


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] in oneDNN's blocked layout (an opaque tensor: only oneDNN ops read it)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def repack_into(packed: torch.Tensor, weight: torch.Tensor) -> None:
    """Rewrite ``packed`` in place from new values of ``weight`` (compiled graphs hold ``packed`` itself)."""
    packed.copy_(pack(weight))


def packed_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x @ W^T`` for 2-D ``x``; ``packed`` is ``pack(W)``. Eager calls skip the op's dispatch."""
    if torch.compiler.is_compiling():
        return torch.ops.hawker.packed_linear(x, packed, out_features)
    return _oneDNN_linear(x, packed)


def _oneDNN_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")


def _packed_linear_op(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    return _oneDNN_linear(x, packed)


def _fake(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))


# The packed weight is an opaque oneDNN tensor, so a call dispatches on the MkldnnCPU key.
define_cpu_op(
    "hawker::packed_linear",
    "(Tensor x, Tensor packed, SymInt out_features) -> Tensor",
    _packed_linear_op,
    _fake,
    extra_keys=("MkldnnCPU",),
)
