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

A weight whose values lie on GGUF Q4_1's grid (4-bit codes, a float16 scale
and offset per group of 32 inputs, as the default model's projections do) can
also be kept as those codes (``pack_q4``, ``hawker::amx_q4_linear``): the
kernel dequantises each panel into the bfloat16 panel ``pack`` would hold and
runs the same tile multiplies, so the same bits from a third of the bytes.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from hawker.kernels import panel_linear
from hawker.kernels.native import CFunction, built_kernel, define_op, load_kernel_library, load_op_library

_LIBRARY = "amx_linear"
OP = "hawker::amx_linear"
Q4_OP = "hawker::amx_q4_linear"
INPUTS_PER_STEP = 32  # inputs one tile multiply takes (csrc/amx_linear.c)
PANEL = panel_linear.PANEL
Q4_GROUP = 32  # inputs that share a scale and offset: one tile step
Q4_STEP_BYTES = Q4_GROUP * PANEL // 2 + 2 * PANEL * 2  # codes, then float16 scales and offsets (csrc/amx_linear.c)


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
        torch.library.impl(Q4_OP, "cpu", _run_q4)
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


def fuses_silu_mul(x: torch.Tensor, out_features: int) -> bool:
    """``silu_mul`` serves these rows: eager (a compiled step fuses its own), 2-D bfloat16 rows read in place,
    a [gate | up] width that comes in whole panels of 32 (csrc/amx_linear.c), the kernel built."""
    return (
        not torch.compiler.is_compiling()
        and x.dim() == 2
        and x.dtype == torch.bfloat16
        and x.stride(1) == 1
        and out_features % 64 == 0
        and _library_function("hawker_amx_linear_silu_mul") is not None
    )


def silu_mul(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """``silu(gate) * up`` where ``[gate | up] = x @ W^T`` (``packed`` is ``pack(W)``, W [out_features, in]),
    without the [rows, out_features] product ever going to memory; the bits of ``amx_linear`` followed by
    hawker/kernels/rowwise.py's ``silu_and_mul``. Check ``fuses_silu_mul`` first."""
    kernel = _library_function("hawker_amx_linear_silu_mul")
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


@functools.cache
def _library_function(name: str) -> CFunction | None:
    """``name`` from the AMX kernels' library (the signature of ``hawker_amx_linear``), None where not built."""
    library = load_kernel_library(_LIBRARY) if _kernel() is not None else None
    if library is None:
        return None
    function = getattr(library, name)
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [pointer, i64, pointer, pointer, i64, i64, i64, i64, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def pack_q4(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """A weight ``scale * codes + offset`` (codes [out, in] in 0..15; scale, offset [out, in / 32] float16
    values) as uint8 [ceil(out / 32), in / 32, Q4_STEP_BYTES]: per panel of 32 outputs and step of 32 inputs,
    the codes [16 input pairs][32 outputs] two to a byte (the pair's first input in the low nibble), then the
    32 outputs' scales and offsets as float16."""
    out_features, in_features = codes.shape
    padded = -(-out_features // PANEL) * PANEL
    if padded != out_features:  # zero outputs: code 0, scale and offset 0
        extra = padded - out_features
        codes = torch.cat([codes, codes.new_zeros((extra, in_features))])
        scale = torch.cat([scale, scale.new_zeros((extra, scale.shape[1]))])
        offset = torch.cat([offset, offset.new_zeros((extra, offset.shape[1]))])
    panels, steps = padded // PANEL, in_features // Q4_GROUP
    nibbles = codes.to(torch.uint8).reshape(panels, PANEL, steps, Q4_GROUP // 2, 2)
    code_bytes = (nibbles[..., 0] | (nibbles[..., 1] << 4)).permute(0, 2, 3, 1).reshape(panels, steps, -1)

    def as_bytes(values: torch.Tensor) -> torch.Tensor:
        halves = values.to(torch.float16).reshape(panels, PANEL, steps).permute(0, 2, 1).contiguous()
        return halves.view(torch.uint8)

    return torch.cat([code_bytes, as_bytes(scale), as_bytes(offset)], dim=-1).contiguous()


def amx_q4_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x @ W^T`` for 2-D bfloat16 ``x``; ``packed`` is ``pack_q4`` of W's grid: ``amx_linear``'s bits."""
    if not torch.compiler.is_compiling() and not _operator_kernel():
        raise RuntimeError("the AMX linear kernel is not built; check available() first")
    return torch.ops.hawker.amx_q4_linear.default(x, packed, out_features)


def _q4_inputs(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> int:
    """The inputs of ``pack_q4``'s panels, checked against the rows (2-D bfloat16) and the outputs."""
    in_features = packed.shape[1] * Q4_GROUP
    fits = packed.dim() == 3 and packed.dtype == torch.uint8 and packed.is_contiguous()
    fits = fits and packed.shape[2] == Q4_STEP_BYTES and packed.shape[0] * PANEL >= out_features
    if not fits or x.dim() != 2 or x.dtype != torch.bfloat16 or x.shape[1] != in_features:
        raise ValueError(f"rows {tuple(x.shape)} do not fit 4-bit panels {tuple(packed.shape)}")
    return in_features


def _run_q4(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    kernel = _library_function("hawker_amx_q4_linear")
    if kernel is None:
        raise RuntimeError("the AMX linear kernel is not built; check available() first")
    in_features = _q4_inputs(x, packed, out_features)
    x = x if x.stride(1) == 1 else x.contiguous()
    out = torch.empty((x.shape[0], out_features), dtype=torch.bfloat16)
    if x.shape[0]:
        status = kernel(
            x.data_ptr(), x.stride(0), packed.data_ptr(), out.data_ptr(), out_features, x.shape[0], in_features,
            out_features, torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("the AMX linear kernel could not allocate its scratch rows")
    return out


def q4_silu_mul(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """``silu_mul`` over ``pack_q4``'s panels: the same bits. Check ``fuses_silu_mul`` first."""
    kernel = _library_function("hawker_amx_q4_linear_silu_mul")
    assert kernel is not None
    in_features = _q4_inputs(x, packed, out_features)
    out = torch.empty((x.shape[0], out_features // 2), dtype=torch.bfloat16)
    if x.shape[0]:
        status = kernel(
            x.data_ptr(), x.stride(0), packed.data_ptr(), out.data_ptr(), out_features // 2, x.shape[0],
            in_features, out_features, torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("the AMX SwiGLU kernel could not allocate its scratch rows")
    return out


def _fake(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))


define_op(OP, "(Tensor x, Tensor packed, SymInt out_features) -> Tensor", _fake)
define_op(Q4_OP, "(Tensor x, Tensor packed, SymInt out_features) -> Tensor", _fake)
