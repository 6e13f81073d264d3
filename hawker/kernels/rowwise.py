"""RMSNorm, SiLU-and-multiply, the rotary embedding and greedy argmax in one pass each over bfloat16 rows
on a CPU (``csrc/rowwise.c``).

An eager prompt step runs RMSNorm as six torch ops, SiLU-and-multiply as
three and the rotation as four, each a pass over memory with its own
conversions: on a 2,048-token step of the default model they took about a
fifth of the step once the matmuls and attention ran on AMX
(benchmarks/NOTES.md, sessions 15 and 16). These kernels round where the
torch code in hawker/layers does, so a result differs from it at most in
the last bit (the order of a float32 sum, exp's last bit; the rotation not
at all); each row's result depends on that row alone. Compiled steps keep
the torch code, which inductor fuses.

``HAWKER_ROWWISE_KERNELS=0`` keeps the torch ops everywhere, the off switch.
"""

from __future__ import annotations

import ctypes
import functools
from typing import NamedTuple

import torch

from hawker.kernels.native import CFunction, load_kernel_library
from hawker.switches import switch_on

SWITCH_VARIABLE = "HAWKER_ROWWISE_KERNELS"


class _Kernels(NamedTuple):
    rms_norm: CFunction
    silu_and_mul: CFunction
    rotary: CFunction
    argmax: CFunction


@functools.cache
def _kernels() -> _Kernels | None:
    library = load_kernel_library("rowwise")
    if library is None:
        return None
    pointer, i64, threads = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    kernels = _Kernels(
        library.hawker_rms_norm, library.hawker_silu_and_mul, library.hawker_rotary, library.hawker_argmax_rows
    )
    kernels.rms_norm.argtypes = [pointer, i64, pointer, pointer, i64, i64, ctypes.c_float, threads]
    kernels.silu_and_mul.argtypes = [pointer, i64, pointer, i64, i64, threads]
    kernels.rotary.argtypes = [pointer, i64, pointer, pointer, pointer, i64, i64, i64, threads]
    kernels.argmax.argtypes = [pointer, i64, pointer, i64, i64, threads]
    for kernel in kernels:
        kernel.restype = ctypes.c_int
    return kernels


def switched_on() -> bool:
    """``HAWKER_ROWWISE_KERNELS``: 1 (the default) or 0; another value is a ValueError."""
    return switch_on(SWITCH_VARIABLE)


def serves(x: torch.Tensor) -> bool:
    """Whether the kernels take ``x``: eager bfloat16 CPU rows, the kernels built and switched on."""
    return (
        x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and x.dim() >= 1
        and x.stride(-1) == 1
        and not torch.compiler.is_compiling()
        and switched_on()
        and _kernels() is not None
    )


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as 2-D rows with unit stride inside a row (a copy only where no such view exists)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x``'s last dimension times ``weight`` (both bfloat16; ``serves(x)`` first)."""
    kernels = _kernels()
    assert kernels is not None
    rows = _rows(x)
    out = torch.empty(rows.shape, dtype=x.dtype)
    weight = weight.contiguous()
    kernels.rms_norm(
        rows.data_ptr(), rows.stride(0), weight.data_ptr(), out.data_ptr(), rows.shape[0], rows.shape[1], eps,
        torch.get_num_threads(),
    )  # fmt: skip
    return out.view(x.shape)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of a fused [gate | up] last dimension (bfloat16; ``serves(gate_up)`` first)."""
    kernels = _kernels()
    assert kernels is not None
    rows = _rows(gate_up)
    size = rows.shape[1] // 2
    out = torch.empty((rows.shape[0], size), dtype=gate_up.dtype)
    kernels.silu_and_mul(rows.data_ptr(), rows.stride(0), out.data_ptr(), rows.shape[0], size, torch.get_num_threads())
    return out.view(*gate_up.shape[:-1], size)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor | None:
    """``x * cos + swap_halves(x) * signed_sin`` for x [T, heads, D] (heads contiguous within a token) and
    angles [T, 1, D], all bfloat16, the same bits as those three torch ops; None where the layout is
    another (``serves(x)`` first)."""
    kernels = _kernels()
    assert kernels is not None
    tokens, heads, dim = x.shape
    if dim % 2 or x.stride(1) != dim or cos.dtype != x.dtype or signed_sin.dtype != x.dtype:
        return None
    cos, signed_sin = cos.reshape(tokens, dim).contiguous(), signed_sin.reshape(tokens, dim).contiguous()
    out = torch.empty((tokens, heads, dim), dtype=x.dtype)
    kernels.rotary(
        x.data_ptr(), x.stride(0), cos.data_ptr(), signed_sin.data_ptr(), out.data_ptr(), tokens, heads, dim,
        torch.get_num_threads(),
    )  # fmt: skip
    return out


def argmax(x: torch.Tensor) -> torch.Tensor | None:
    """The first index of each row's largest value of 2-D bfloat16 ``x`` (``torch.max(dim=-1).indices``), in
    one pass without widening the rows to float32; None where a row holds NaN (``serves(x)`` first)."""
    kernels = _kernels()
    assert kernels is not None
    rows = _rows(x)
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        return None
    out = torch.empty(rows.shape[0], dtype=torch.long)
    found_nan = kernels.argmax(
        rows.data_ptr(), rows.stride(0), out.data_ptr(), rows.shape[0], rows.shape[1], torch.get_num_threads()
    )
    return None if found_nan else out
