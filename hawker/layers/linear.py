"""Linear layers that own only their tensor-parallel shard of the weight.

Column-parallel layers split the output dimension, row-parallel layers split
the input dimension and all-reduce their partial sums. ``load`` copies this
rank's slice out of a full checkpoint tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hawker.layers.parallel import TPInfo
from hawker.layers.projection import ProjectionCopies


class ColumnParallelLinear(ProjectionCopies, nn.Module):
    """``y = x W^T`` with W's rows (outputs) split into named shards per rank.

    ``shard_sizes`` are the full (unsplit) output sizes of the shards stacked
    in this layer, e.g. (q, k, v) for a fused QKV projection.
    """

    def __init__(
        self, in_features: int, shard_sizes: Sequence[int], bias: bool, tp: TPInfo, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.tp = tp
        self.local_sizes = [tp.shard(size) for size in shard_sizes]
        out_local = sum(self.local_sizes)
        self.weight = nn.Parameter(torch.empty(out_local, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_local, dtype=dtype), requires_grad=False) if bias else None

    def load(self, name: str, full: torch.Tensor, shard: int = 0) -> None:
        target = self.weight if name == "weight" else self.bias
        assert target is not None, f"checkpoint has a {name} this layer does not use"
        size = self.local_sizes[shard]
        offset = sum(self.local_sizes[:shard])
        piece = full.narrow(0, self.tp.rank * size, size)
        target.data.narrow(0, offset, size).copy_(piece)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x, self.bias)


class RowParallelLinear(ProjectionCopies, nn.Module):
    """``y = x W^T`` with W's columns (inputs) split per rank, summed across ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPInfo, dtype: torch.dtype) -> None:
        super().__init__()
        self.tp = tp
        self.in_local = tp.shard(in_features)
        self.weight = nn.Parameter(torch.empty(out_features, self.in_local, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    def load(self, name: str, full: torch.Tensor, shard: int = 0) -> None:
        del shard
        if name == "bias":
            assert self.bias is not None
            self.bias.data.copy_(full)
            return
        self.weight.data.copy_(full.narrow(1, self.tp.rank * self.in_local, self.in_local))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.all_reduce(self.project(x))
        # The bias is added once, after the reduction.
        return out if self.bias is None else out + self.bias
