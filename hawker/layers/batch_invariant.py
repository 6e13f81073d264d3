"""Batch invariance: a token's numbers must not depend on which other tokens share its step.

A CPU (or GPU) kernel's order of floating-point operations depends on the
shape it is given: matmul blocking, vectorised bodies and scalar tails,
how work is split over threads. The same token in a step of 3 rows and in
one of 300 rows can therefore round differently. Two rules remove that:

- token-wise work (norms, projections, activations, the LM head) runs on
  fixed tiles of ``tile`` rows, the last one zero-padded, each tile copied
  into a fresh (aligned) buffer, so every kernel always sees the same shape;
- attention runs one query at a time over exactly its own context
  (``hawker/attention/torch_backend.py``), so its shape depends only on
  the token's position.

The cost is the loss of large-batch efficiency (see README, batch-invariant mode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

DEFAULT_TILE_ROWS = 16


@dataclass(frozen=True)
class RowTiler:
    """Applies a row-wise function on fixed tiles of ``tile`` rows; 0 = call it on the whole input."""

    tile: int = 0

    def __call__(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if not self.tile:
            return fn(x)
        rows = x.shape[0]
        padded = -(-rows // self.tile) * self.tile
        outputs = []
        for first in range(0, padded, self.tile):
            tile = x.new_zeros((self.tile, *x.shape[1:]))
            piece = x[first : first + self.tile]
            tile[: piece.shape[0]] = piece
            outputs.append(fn(tile))
        return torch.cat(outputs)[:rows]
