"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hawker.kernels import rowwise
from hawker.layers.linear import ColumnParallelLinear


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused [gate | up] projection (eager bfloat16 CPU rows: one pass, hawker/kernels/rowwise.py)."""
    if rowwise.serves(gate_up):
        return rowwise.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(gate_up_proj: ColumnParallelLinear, x: torch.Tensor) -> torch.Tensor:
    """``silu_and_mul(gate_up_proj(x))``, in one pass where the projection's kernel can fuse the two
    (``ProjectionCopies.project_silu_mul``): the same bits either way."""
    fused = gate_up_proj.project_silu_mul(x) if gate_up_proj.bias is None else None
    return fused if fused is not None else silu_and_mul(gate_up_proj(x))
