"""Linear layers that own only their tensor-parallel shard of the weight.

Column-parallel layers split the output dimension, row-parallel layers split
the input dimension and all-reduce their partial sums. ``load`` copies this
rank's slice out of a checkpoint tensor, which may be a lazy safetensors
slice: only the rows or columns this rank holds are read from the file.
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
    in this layer, e.g. (q, k, v) for a fused QKV projection. ``shard_parts``
    says into how many distinct pieces each shard is cut (default: one per
    rank); with fewer pieces than ranks, ranks share a piece (replicated
    grouped-query KV heads), rank r holding piece ``r * parts // size``.
    """

    def __init__(
        self,
        in_features: int,
        shard_sizes: Sequence[int],
        bias: bool,
        tp: TPInfo,
        dtype: torch.dtype,
        shard_parts: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp
        parts = list(shard_parts) if shard_parts is not None else [tp.size] * len(shard_sizes)
        if any(size % part for size, part in zip(shard_sizes, parts, strict=True)):
            raise ValueError(f"output sizes {list(shard_sizes)} cannot be cut into {parts} pieces")
        self.full_sizes = list(shard_sizes)
        self.in_features = in_features
        self.local_sizes = [size // part for size, part in zip(shard_sizes, parts, strict=True)]
        self.pieces = [tp.rank * part // tp.size for part in parts]
        out_local = sum(self.local_sizes)
        self.weight = nn.Parameter(torch.empty(out_local, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_local, dtype=dtype), requires_grad=False) if bias else None

    def checkpoint_shape(self, name: str, shard: int = 0) -> tuple[int, ...]:
        """The shape of the whole checkpoint tensor that ``load(name, ..., shard)`` takes its rows from."""
        size = self.full_sizes[shard]
        return (size, self.in_features) if name == "weight" else (size,)

    def load(self, name: str, full: torch.Tensor, shard: int = 0) -> None:
        target = self.weight if name == "weight" else self.bias
        assert target is not None, f"checkpoint has a {name} this layer does not use"
        size = self.local_sizes[shard]
        offset = sum(self.local_sizes[:shard])
        first = self.pieces[shard] * size
        target.data.narrow(0, offset, size).copy_(full[first : first + size])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x, self.bias)


class RowParallelLinear(ProjectionCopies, nn.Module):
    """``y = x W^T`` with W's columns (inputs) split per rank, summed across ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPInfo, dtype: torch.dtype) -> None:
        super().__init__()
        self.tp = tp
        self.in_features = in_features
        self.in_local = tp.shard(in_features)
        self.weight = nn.Parameter(torch.empty(out_features, self.in_local, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    def checkpoint_shape(self, name: str, shard: int = 0) -> tuple[int, ...]:
        """The shape of the whole checkpoint tensor that ``load(name, ...)`` takes its columns from."""
        del shard
        out_features = self.weight.shape[0]
        return (out_features, self.in_features) if name == "weight" else (out_features,)

    def load(self, name: str, full: torch.Tensor, shard: int = 0) -> None:
        del shard
        if name == "bias":
            assert self.bias is not None
            self.bias.data.copy_(full[:])
            return
        first = self.tp.rank * self.in_local
        self.weight.data.copy_(full[:, first : first + self.in_local])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = self.tp.overlap_chunks
        if self.tp.size > 1 and chunks > 1 and x.dim() == 2 and x.shape[0] >= chunks:
            out = self._reduce_overlapped(x, chunks)
        else:
            out = self.tp.all_reduce(self.project(x))
        # The bias is added once, after the reduction.
        return out if self.bias is None else out + self.bias

    def _reduce_overlapped(self, x: torch.Tensor, chunks: int) -> torch.Tensor:
        """Multiply chunk i+1 while chunk i's partial sums are being all-reduced."""
        parts: list[torch.Tensor] = []
        pending = []
        for piece in x.tensor_split(chunks, dim=0):
            partial = self.project(piece)
            pending.append(self.tp.all_reduce_async(partial))
            parts.append(partial)
        for work in pending:
            work.wait()
        return torch.cat(parts, dim=0)
