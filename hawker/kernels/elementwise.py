"""Fused row-wise kernels of a decoder layer: RMSNorm (+ residual add), SiLU-and-multiply, rotary.

Each replaces several torch ops (and their passes over memory) with one
kernel and computes what ``hawker/layers`` computes in torch, in float32
inside. RMSNorm and SiLU round where the torch path does; rotary rounds once
at the end where torch rounds after each product, so half-precision results
can differ in the last bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    eps,
    size,
    stride_x,
    stride_residual,
    stride_out,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < size
    x = tl.load(x_ptr + row * stride_x + cols, mask=inside, other=0.0)
    if HAS_RESIDUAL:
        # The sum is rounded to the activation dtype (it is the next residual), then normalised.
        x = x + tl.load(residual_ptr + row * stride_residual + cols, mask=inside, other=0.0)
        tl.store(residual_ptr + row * stride_residual + cols, x, mask=inside)
    x32 = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x32 * x32, 0) / size + eps)
    normed = (x32 * inv_rms).to(x.dtype)
    weight = tl.load(weight_ptr + cols, mask=inside, other=0.0)
    tl.store(out_ptr + row * stride_out + cols, weight * normed, mask=inside)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of the rows of ``x`` [T, size]; with ``residual``, of ``x + residual``, which is
    written back into ``residual`` (the next layer's residual stream)."""
    rows, size = x.shape
    out = torch.empty_like(x)
    if rows == 0:
        return out
    _rms_norm_kernel[(rows,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        eps,
        size,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        HAS_RESIDUAL=residual is not None,
        BLOCK=triton.next_power_of_2(size),
    )
    return out


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, size, stride_in, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < size
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=inside, other=0.0)
    up = tl.load(gate_up_ptr + row * stride_in + size + cols, mask=inside, other=0.0)
    gate32 = gate.to(tl.float32)
    # torch's silu rounds to the input dtype before the product with ``up``.
    activated = (gate32 / (1.0 + tl.exp(-gate32))).to(gate.dtype)
    tl.store(out_ptr + row * stride_out + cols, activated * up, mask=inside)


def silu_and_mul(gate_up: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """SwiGLU of a fused [gate | up] projection [T, 2 * size] -> [T, size]."""
    rows, width = gate_up.shape
    size = width // 2
    out = torch.empty(rows, size, dtype=gate_up.dtype, device=gate_up.device)
    if rows == 0:
        return out
    block = min(block, triton.next_power_of_2(size))
    _silu_and_mul_kernel[(rows, triton.cdiv(size, block))](
        gate_up, out, size, gate_up.stride(0), out.stride(0), BLOCK=block
    )
    return out


@triton.jit
def _rotary_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    positions_ptr,
    stride_xt,
    stride_xh,
    stride_table,
    HALF: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    position = tl.load(positions_ptr + token)
    cols = tl.arange(0, HALF)
    base = x_ptr + token * stride_xt + head * stride_xh
    first = tl.load(base + cols)
    second = tl.load(base + HALF + cols)
    # The angles are rounded to the activation dtype first, as the torch path (and HF) does.
    cos = tl.load(cos_ptr + position * stride_table + cols).to(first.dtype).to(tl.float32)
    sin = tl.load(sin_ptr + position * stride_table + cols).to(first.dtype).to(tl.float32)
    first32, second32 = first.to(tl.float32), second.to(tl.float32)
    tl.store(base + cols, (first32 * cos - second32 * sin).to(first.dtype))
    tl.store(base + HALF + cols, (second32 * cos + first32 * sin).to(first.dtype))


def rotary_in_place(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> None:
    """Rotate x [T, heads, D] in place (neox / rotate-half layout).

    cos, sin: [max_positions, D / 2] float32 tables; positions: [T].
    """
    tokens, heads, head_dim = x.shape
    if tokens == 0:
        return
    assert x.stride(-1) == 1 and cos.stride() == sin.stride()
    _rotary_kernel[(tokens, heads)](x, cos, sin, positions, x.stride(0), x.stride(1), cos.stride(0), HALF=head_dim // 2)
