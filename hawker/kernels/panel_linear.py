"""A bfloat16 linear by AVX512-BF16 dot products over a weight packed once (``csrc/bf16_pair_linear.c``).

On a CPU with AVX512-BF16 and no AMX, oneDNN's bfloat16 matmul runs well
below its float32 one, and the float32 copy reads twice the bytes; a decode
step of 16-64 rows is bound by reading the weights (benchmarks/NOTES.md).
This kernel reads the bfloat16 weight once per step at vector speed. Each row
is computed on its own in a fixed order, so its bits never depend on the
other rows of the step: a plan can use it untiled at every row count under
consistent numerics.

Inside a ``torch.compile``'d step the call goes through the plain operator
``hawker::bf16_pair_linear`` (one opaque node); eager calls run it directly.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from hawker.kernels.native import CFunction, built_kernel, define_cpu_op

_LIBRARY = "panel_linear"
PANEL = 32  # outputs a packed panel holds (csrc/panel_linear.c)


@functools.cache
def _kernel() -> CFunction | None:
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    return built_kernel(_LIBRARY, [pointer, i64, pointer, pointer, i64, i64, i64, i64, ctypes.c_int])


def available() -> bool:
    """This CPU has AVX512-BF16 and the kernel was built for it."""
    return _kernel() is not None


def supports(weight: torch.Tensor) -> bool:
    """A 2-D bfloat16 CPU weight with an even number of inputs (the kernel takes inputs in pairs)."""
    return (
        weight.dim() == 2
        and weight.dtype == torch.bfloat16
        and weight.device.type == "cpu"
        and weight.shape[1] % 2 == 0
        and available()
    )


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] as [ceil(out / 32), in / 2, 32, 2]: panels of 32 outputs, inputs in pairs."""
    out_features, in_features = weight.shape
    padded = -(-out_features // PANEL) * PANEL
    if padded != out_features:
        weight = torch.cat([weight, weight.new_zeros((padded - out_features, in_features))])
    panels = weight.detach().reshape(padded // PANEL, PANEL, in_features // 2, 2)
    return panels.permute(0, 2, 1, 3).contiguous()


def repack_into(packed: torch.Tensor, weight: torch.Tensor) -> None:
    """Rewrite ``packed`` in place from new values of ``weight`` (compiled graphs hold ``packed`` itself)."""
    packed.copy_(pack(weight))


def panel_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x @ W^T`` for 2-D bfloat16 ``x``; ``packed`` is ``pack(W)``."""
    if torch.compiler.is_compiling():
        return torch.ops.hawker.panel_linear(x, packed, out_features)
    return _run(x, packed, out_features)


def checked_inputs(x: torch.Tensor, packed: torch.Tensor) -> int:
    """The weight's inputs, after checking that ``x`` is 2-D bfloat16 rows of that many (ValueError else);
    for every kernel over this packing (this one, hawker/kernels/amx_linear.py)."""
    if x.dtype != torch.bfloat16 or x.dim() != 2:
        raise ValueError(f"expected 2-D bfloat16 rows, got {x.dtype} {tuple(x.shape)}")
    in_features = packed.shape[1] * 2
    if x.shape[1] != in_features:
        raise ValueError(f"rows have {x.shape[1]} inputs, the weight takes {in_features}")
    return in_features


def _run(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("the panel linear kernel is not built; check available() first")
    in_features = checked_inputs(x, packed)
    rows = x.shape[0]
    x = x.to(torch.float32).contiguous()  # widened exactly; the kernel broadcasts float32 values
    out = torch.empty((rows, out_features), dtype=torch.bfloat16)
    if rows:
        kernel(
            x.data_ptr(),
            x.stride(0),
            packed.data_ptr(),
            out.data_ptr(),
            out_features,
            rows,
            in_features,
            out_features,
            torch.get_num_threads(),
        )
    return out


def _fake(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))


define_cpu_op("hawker::panel_linear", "(Tensor x, Tensor packed, SymInt out_features) -> Tensor", _run, _fake)
