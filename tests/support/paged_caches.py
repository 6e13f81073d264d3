"""Random paged KV caches for the attention kernels' tests: each sequence scattered over shuffled blocks."""

from __future__ import annotations

import torch


def scattered_caches(
    context_lens: list[int],
    kv_heads: int,
    dim: int,
    block_size: int,
    dtype: torch.dtype,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k_cache, v_cache, block_tables): random [blocks, block_size, kv_heads, dim] caches with spare blocks, and
    one table row per context, wider than it needs (the rest is never read)."""
    needed = [-(-length // block_size) for length in context_lens]
    num_blocks = sum(needed) + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=generator).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=generator).to(dtype)
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables = torch.zeros(len(context_lens), max(needed) + 2, dtype=torch.long)
    used = 0
    for row, count in enumerate(needed):
        tables[row, :count] = torch.tensor(order[used : used + count])
        used += count
    return k_cache, v_cache, tables
