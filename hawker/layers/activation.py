"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hawker.kernels import rowwise


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused [gate | up] projection (eager bfloat16 CPU rows: one pass, hawker/kernels/rowwise.py)."""
    if rowwise.serves(gate_up):
        return rowwise.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
