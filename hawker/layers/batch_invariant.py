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
        return tiled_rows(fn, x, self.tile, copy_full_tiles=True)


def tiled_rows(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, copy_full_tiles: bool = False
) -> torch.Tensor:
    """``fn`` (row-wise) applied to ``x`` on tiles of exactly ``tile`` rows, the last one zero-padded.

    Every call then has one shape, so every row is reduced in one order. A
    partial last tile is always copied into a fresh buffer; full tiles are
    views unless ``copy_full_tiles`` (batch-invariant mode also fixes the
    buffer's alignment; consistent numerics, hawker/layers/projection.py,
    measured views to give the same rows).
    """
    rows = x.shape[0]
    if rows == tile and not copy_full_tiles:
        return fn(x)
    parts = []
    for first in range(0, rows, tile):
        piece = x[first : first + tile]
        if piece.shape[0] < tile or copy_full_tiles:
            padded = x.new_zeros((tile, *x.shape[1:]))
            padded[: piece.shape[0]] = piece
            parts.append(fn(padded)[: piece.shape[0]])
        else:
            parts.append(fn(piece))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
