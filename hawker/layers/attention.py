"""Attention layer: attends through whichever backend built the step's metadata (hawker/attention/backend.py)."""

from __future__ import annotations

import torch
from torch import nn

from hawker.attention.backend import StepAttention


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: StepAttention,
    ) -> torch.Tensor:
        return meta.attend(q, k, v, kv_cache[0], kv_cache[1], self.scale)
