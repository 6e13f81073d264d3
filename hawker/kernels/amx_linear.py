"""A bfloat16 linear by AMX tile multiplies over the panel-packed weight (``csrc/amx_linear.c``).

oneDNN's bfloat16 matmul on an AMX CPU is fast, but the sums of a row depend
on how many rows the call has, so consistent numerics may only use it on fixed
zero-padded tiles, at 2-2.5x its untiled cost on prompt-sized steps. This
kernel computes each row on its own in a fixed order (32 inputs a tile
multiply, float32 sums, one rounding), so a plan can use it untiled at every
row count. It reads the weight in the panel kernel's layout
(hawker/kernels/panel_linear.py), packed once.

Every call goes through the operator ``hawker::amx_linear`` (one opaque node
in a ``torch.compile``'d step), whose CPU kernel is C++
(``csrc/amx_linear_op.cpp``) where it builds, else ``_run`` through ctypes.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from hawker.kernels import panel_linear
from hawker.kernels.native import CFunction, built_kernel, define_op, load_kernel_library, load_op_library

_LIBRARY = "amx_linear"
OP = "hawker::amx_linear"
INPUTS_PER_STEP = 32  # inputs one tile multiply takes (csrc/amx_linear.c)


@functools.cache
def _kernel() -> CFunction | None:
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    return built_kernel(_LIBRARY, [pointer, i64, pointer, pointer, i64, i64, i64, i64, ctypes.c_int])


@functools.cache
def _operator_kernel() -> bool:
    """Registers the operator's CPU kernel once: the C++ one where it builds, else ``_run``. False without
    the C kernel (no AMX here, or no compiler)."""
    if _kernel() is None:
        return False
    if load_op_library(f"{_LIBRARY}_op", load_kernel_library(_LIBRARY)) is None:
        torch.library.impl(OP, "cpu", _run)
    return True


def available() -> bool:
    """This CPU has AMX, this process may use it, and the kernel was built for it."""
    return _operator_kernel()


def supports(weight: torch.Tensor) -> bool:
    """A 2-D bfloat16 CPU weight whose inputs come in whole tile steps of 32."""
    return (
        weight.dim() == 2
        and weight.dtype == torch.bfloat16
        and weight.device.type == "cpu"
        and weight.shape[1] % INPUTS_PER_STEP == 0
        and available()
    )


pack = panel_linear.pack


def amx_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x @ W^T`` for 2-D bfloat16 ``x``; ``packed`` is ``pack(W)``."""
    if not torch.compiler.is_compiling() and not _operator_kernel():
        raise RuntimeError("the AMX linear kernel is not built; check available() first")
    return torch.ops.hawker.amx_linear.default(x, packed, out_features)


def _run(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("the AMX linear kernel is not built; check available() first")
    in_features = panel_linear.checked_inputs(x, packed)
    if x.stride(1) != 1:
        x = x.contiguous()
    rows = x.shape[0]
    out = torch.empty((rows, out_features), dtype=torch.bfloat16)
    if rows:
        status = kernel(
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
        if status != 0:
            raise MemoryError("the AMX linear kernel could not allocate its scratch rows")
    return out


@functools.cache
def _silu_mul_kernel() -> CFunction | None:
    library = load_kernel_library(_LIBRARY) if _kernel() is not None else None
    if library is None:
        return None
    function = library.hawker_amx_linear_silu_mul
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [pointer, i64, pointer, pointer, i64, i64, i64, i64, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def fuses_silu_mul(x: torch.Tensor, out_features: int) -> bool:
    """``silu_mul`` serves these rows: eager (a compiled step fuses its own), 2-D bfloat16 rows read in place,
    a [gate | up] width that comes in whole panels of 32 (csrc/amx_linear.c), the kernel built."""
    return (
        not torch.compiler.is_compiling()
        and x.dim() == 2
        and x.dtype == torch.bfloat16
        and x.stride(1) == 1
        and out_features % 64 == 0
        and _silu_mul_kernel() is not None
    )


def silu_mul(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """``silu(gate) * up`` where ``[gate | up] = x @ W^T`` (``packed`` is ``pack(W)``, W [out_features, in]),
    without the [rows, out_features] product ever going to memory; the bits of ``amx_linear`` followed by
    hawker/kernels/rowwise.py's ``silu_and_mul``. Check ``fuses_silu_mul`` first."""
    kernel = _silu_mul_kernel()
    assert kernel is not None
    in_features = panel_linear.checked_inputs(x, packed)
    rows, size = x.shape[0], out_features // 2
    out = torch.empty((rows, size), dtype=torch.bfloat16)
    if rows:
        status = kernel(
            x.data_ptr(), x.stride(0), packed.data_ptr(), out.data_ptr(), size, rows, in_features, out_features,
            torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("the AMX SwiGLU kernel could not allocate its scratch rows")
    return out


def _fake(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))


define_op(OP, "(Tensor x, Tensor packed, SymInt out_features) -> Tensor", _fake)
