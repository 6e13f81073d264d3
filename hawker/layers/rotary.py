"""Rotary position embedding (neox / rotate-half layout) with HF's scalings."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from hawker.config import RopeScaling
from hawker.kernels import rowwise


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "llama3":
        return _llama3_frequencies(inv_freq, scaling)
    return inv_freq


def _llama3_frequencies(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept,
    # and the band between them interpolated smoothly.
    old_len = s.original_max_position_embeddings
    low_freq_wavelen = old_len / s.low_freq_factor
    high_freq_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


@dataclass(frozen=True)
class RotaryAngles:
    """Every token's rotary angles as [T, 1, D] in the activation dtype.

    ``cos`` is [cos | cos] and ``signed_sin`` is [-sin | sin], so that a
    rotation is ``x * cos + swap_halves(x) * signed_sin``: the same roundings
    as the textbook ``x1 cos - x2 sin, x2 cos + x1 sin`` (negation is exact)
    in fewer ops. Computed once per step and shared by all layers.
    """

    cos: torch.Tensor
    signed_sin: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, D] rotated (neox / rotate-half layout), e.g. queries and keys stacked on dim 1.
        Eager bfloat16 CPU rows in one pass (hawker/kernels/rowwise.py, the same bits)."""
        if x.dim() == 3 and rowwise.serves(x):
            rotated = rowwise.rotate(x, self.cos, self.signed_sin)
            if rotated is not None:
                return rotated
        half = x.shape[-1] // 2
        swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
        return x * self.cos + swapped * self.signed_sin


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: RopeScaling) -> None:
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        self.register_buffer("cos", torch.cat((cos, cos), dim=-1), persistent=False)
        self.register_buffer("signed_sin", torch.cat((-sin, sin), dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryAngles:
        """The angles of ``positions`` [T], cast to ``dtype`` as HF does before rotating."""
        cos, signed_sin = self.get_buffer("cos"), self.get_buffer("signed_sin")
        return RotaryAngles(cos[positions].unsqueeze(1).to(dtype), signed_sin[positions].unsqueeze(1).to(dtype))
