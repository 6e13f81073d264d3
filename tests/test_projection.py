"""Consistent numerics' tiled projection (hawker/layers/projection.py) writes full tiles in place.

The in-place path must give every row exactly the bits that multiplying its
own zero-padded tile with ``F.linear`` gives (``tiled_rows``), for inputs of
one tile, several, several plus a partial one, with and without a bias.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hawker.layers.batch_invariant import tiled_rows
from hawker.layers.projection import ProjectionCopies

TILE = 32


class _Projection(ProjectionCopies, nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.dense_tile_rows = TILE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [TILE, 2 * TILE, 3 * TILE + 5, 7 * TILE - 1])
@pytest.mark.parametrize("with_bias", [False, True])
def test_in_place_tiles_give_the_bits_of_separate_tiles(dtype: torch.dtype, rows: int, with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=generator).to(dtype)
    x = torch.randn(rows, 64, generator=generator).to(dtype)
    bias = torch.randn(96, generator=generator).to(dtype) if with_bias else None
    expected = tiled_rows(lambda tile: F.linear(tile, weight), x, TILE)
    if bias is not None:
        expected = expected + bias
    assert torch.equal(_Projection(weight).project(x, bias), expected)
