"""Vocabulary-parallel embedding and LM head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hawker.layers.parallel import TPInfo
from hawker.layers.projection import ProjectionCopies


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous slice of the vocabulary's rows."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPInfo, dtype: torch.dtype) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // tp.size)
        self.start = tp.rank * self.rows
        self.weight = nn.Parameter(torch.zeros(self.rows, hidden_size, dtype=dtype), requires_grad=False)

    def checkpoint_shape(self, name: str, shard: int = 0) -> tuple[int, ...]:
        """The whole vocabulary's rows, of which this rank keeps a slice."""
        del name, shard
        return (self.vocab_size, self.weight.shape[1])

    def load(self, name: str, full: torch.Tensor, shard: int = 0) -> None:
        del name, shard
        piece = full[self.start : self.start + self.rows]  # the last rank's slice may be short
        self.weight.data[: piece.shape[0]].copy_(piece)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(out)


class ParallelLMHead(ProjectionCopies, VocabParallelEmbedding):  # type: ignore[misc]  # both hold the weight
    """Projects hidden states onto this rank's vocabulary slice, then gathers."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.tp.all_gather_last_dim(self.project(hidden))
        return out[..., : self.vocab_size]
