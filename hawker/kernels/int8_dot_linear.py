"""A linear over 4- or 8-bit weight codes by 8-bit integer dot products (``csrc/int8_dot_linear.c``).

GGUF's Q4_1 and Q8_0 weights are codes with a scale (and offset) per group of
32; llama.cpp multiplies them by quantising each row of activations to 8 bits
per group of 32 and summing integer products (AVX512-VNNI's ``vpdpbusd``: 64
multiply-adds an instruction). This kernel does the same: a quarter (4-bit) or
half (8-bit) of bfloat16's bytes to read, and integer arithmetic where steps
of many rows are bound by arithmetic. The price is the activations' rounding
to 8 bits per group (relative error ~1/254 of the group's largest value), which
is why this copy is taken only for half-precision models and has an off switch
(``MatmulOptions.int8_dot``, ``--no-int8-dot``).

Each row is quantised and summed on its own, in a fixed order: a row's bits
never depend on the other rows, so consistent numerics may use it untiled.
Every call goes through the operator ``hawker::int8_dot_linear`` (one opaque
node in a ``torch.compile``'d step). Its CPU kernel is C++
(``csrc/int8_dot_linear_op.cpp``, built on first use) where torch's headers and
a C++ compiler are at hand, else ``_run`` here through ctypes: ~6 against
~14 us a call, 120 calls a decode step of the default model.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from hawker.kernels.native import CFunction, built_kernel, define_op, load_kernel_library, load_op_library

_LIBRARY = "int8_dot_linear"
OP = "hawker::int8_dot_linear"
PANEL = 16  # outputs a packed panel holds (csrc/int8_dot_linear.c)
GROUP = 32  # inputs that share a scale and offset
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


@functools.cache
def _kernel() -> CFunction | None:
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    return built_kernel(_LIBRARY, [pointer, i64, pointer, i32, pointer, i64, i64, i64, i64, i32, i32])


@functools.cache
def _operator_kernel() -> bool:
    """Registers the operator's CPU kernel once: the C++ one where it builds, else ``_run``. False without
    the C kernel (this CPU lacks AVX512-VNNI, or there is no compiler)."""
    if _kernel() is None:
        return False
    if load_op_library(f"{_LIBRARY}_op", load_kernel_library(_LIBRARY)) is None:
        torch.library.impl(OP, "cpu", _run)
    return True


def available() -> bool:
    """This CPU has AVX512-VNNI and the kernel was built for it."""
    return _operator_kernel()


def supports(dtype: torch.dtype, explicit: bool = False) -> bool:
    """Rows of ``dtype`` can go through the kernel here: bfloat16, or float32 when asked for ``explicit``ly
    (a float32 model asked for more precision than 8-bit activations keep)."""
    return available() and (dtype == torch.bfloat16 or (explicit and dtype == torch.float32))


def pack(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    """Weights ``scale * codes + offset`` (codes [out, in] in 0..2^bits-1; scale, offset [out, in / 32]) packed
    as the kernel reads them: [ceil(out / 16), in / 32, block] bytes, one block per group (csrc layout)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    out_features, in_features = codes.shape
    if in_features % GROUP:
        raise ValueError(f"inputs ({in_features}) must be a multiple of {GROUP}")
    padded = -(-out_features // PANEL) * PANEL
    groups = in_features // GROUP
    codes = _pad_rows(codes.to(torch.uint8), padded)
    panels = padded // PANEL
    if bits == 4:
        # [panel, output, group, vector, nibble, input]: input 32g + 8c + 4h + i
        split = codes.view(panels, PANEL, groups, 4, 2, 4).permute(0, 2, 3, 4, 1, 5)
        data = (split[:, :, :, 0] | (split[:, :, :, 1] << 4)).reshape(panels, groups, 4 * 64)
    else:
        data = codes.view(panels, PANEL, groups, 8, 4).permute(0, 2, 3, 1, 4).reshape(panels, groups, 8 * 64)
    halves = [
        _pad_rows(values.to(torch.float16), padded).view(panels, PANEL, groups).transpose(1, 2).contiguous()
        for values in (scale, offset)
    ]
    scales = torch.cat(halves, dim=-1).view(torch.uint8)  # [panel, group, 64]: 16 scales then 16 offsets
    return torch.cat([data, scales], dim=-1).contiguous()


def _pad_rows(values: torch.Tensor, rows: int) -> torch.Tensor:
    if values.shape[0] == rows:
        return values
    return torch.cat([values, values.new_zeros((rows - values.shape[0], *values.shape[1:]))])


def int8_dot_linear(x: torch.Tensor, packed: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """``x @ W^T`` for 2-D float32 or bfloat16 ``x``; ``packed`` is ``pack(...)`` of W."""
    if not torch.compiler.is_compiling() and not _operator_kernel():
        raise RuntimeError("the int8 dot linear kernel is not built; check available() first")
    return torch.ops.hawker.int8_dot_linear.default(x, packed, bits, out_features)


def _run(x: torch.Tensor, packed: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("the int8 dot linear kernel is not built; check available() first")
    if x.dim() != 2 or x.dtype not in _DTYPE_CODES:
        raise ValueError(f"expected 2-D float32 or bfloat16 rows, got {x.dtype} {tuple(x.shape)}")
    in_features = packed.shape[1] * GROUP
    if x.shape[1] != in_features:
        raise ValueError(f"rows have {x.shape[1]} inputs, the weight takes {in_features}")
    if x.stride(1) != 1:
        x = x.contiguous()
    rows = x.shape[0]
    out = torch.empty((rows, out_features), dtype=x.dtype)
    if rows:
        status = kernel(
            x.data_ptr(),
            x.stride(0),
            packed.data_ptr(),
            bits,
            out.data_ptr(),
            out_features,
            rows,
            in_features,
            out_features,
            _DTYPE_CODES[x.dtype],
            torch.get_num_threads(),
        )
        if status:
            raise RuntimeError(f"int8 dot linear kernel failed ({status})")
    return out


def _fake(x: torch.Tensor, packed: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))


define_op(OP, "(Tensor x, Tensor packed, int bits, SymInt out_features) -> Tensor", _fake)
