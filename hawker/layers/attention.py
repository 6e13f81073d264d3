"""Attention layer: dispatches to the backend chosen for the device."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from hawker.attention.metadata import AttentionMetadata
from hawker.attention.torch_backend import paged_attention


class BackendMetadata(Protocol):
    """A non-torch backend's per-step metadata, which knows how to attend."""

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scale: float,
    ) -> torch.Tensor: ...


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
        meta: AttentionMetadata | BackendMetadata,
    ) -> torch.Tensor:
        if isinstance(meta, AttentionMetadata):  # the torch backend
            return paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return meta.attend(q, k, v, kv_cache[0], kv_cache[1], self.scale)
