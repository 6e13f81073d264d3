"""Tensor- and pipeline-parallel coordinates of one rank. With size 1 (the default) every call is a no-op."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class HeadShard:
    """This rank's share of ``total`` attention heads.

    Heads split evenly when there are at least as many as ranks; with fewer
    (grouped-query KV heads on many ranks) each head is replicated on
    ``size // total`` neighbouring ranks, which then read the same piece.
    """

    local: int  # heads held by this rank
    parts: int  # distinct pieces the heads are cut into across the ranks
    part: int  # the piece this rank holds


@dataclass(frozen=True)
class TPInfo:
    rank: int = 0
    size: int = 1
    # The tensor-parallel process group (None: the default group).
    group: Any = field(default=None, compare=False, repr=False)
    # Row-parallel layers split their rows into this many chunks and reduce
    # each chunk asynchronously while the next one is multiplied (1 = off).
    overlap_chunks: int = 1

    def shard(self, full: int) -> int:
        if full % self.size:
            raise ValueError(f"dimension {full} is not divisible by tensor_parallel_size {self.size}")
        return full // self.size

    def heads(self, total: int) -> HeadShard:
        if total >= self.size:
            return HeadShard(self.shard(total), self.size, self.rank)
        if self.size % total:
            raise ValueError(f"{total} KV heads cannot be replicated evenly over tensor_parallel_size {self.size}")
        return HeadShard(1, total, self.rank * total // self.size)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_reduce_async(self, x: torch.Tensor) -> Any:
        """Start summing ``x`` in place across the ranks; returns the work handle to wait on."""
        return dist.all_reduce(x, group=self.group, async_op=True)

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


@dataclass(frozen=True)
class PPInfo:
    """This rank's pipeline stage: a contiguous run of the decoder layers."""

    rank: int = 0
    size: int = 1

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def layer_range(self, num_layers: int) -> range:
        """Layers of this stage; the first ``num_layers % size`` stages take one extra."""
        if num_layers < self.size:
            raise ValueError(f"{num_layers} layers cannot be split into pipeline_parallel_size {self.size} stages")
        base, extra = divmod(num_layers, self.size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))
