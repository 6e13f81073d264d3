"""A projection multiplies through the copy its plan picks; tiled copies give every row the bits of its own tile.

The tiled path (consistent numerics on a CPU whose kernels are not
row-invariant) writes full tiles in place and must give every row exactly
the bits that multiplying its own zero-padded tile with ``F.linear`` gives
(``tiled_rows``): one tile, several, several plus a partial one, with and
without a bias.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hawker.layers.batch_invariant import tiled_rows
from hawker.layers.matmul_plan import ANY_ROWS, LayerPlan, PlanStep
from hawker.layers.projection import ProjectionCopies
from hawker.layers.weight_copies import DENSE, PACKED, build_copy

TILE = 32


class _Projection(ProjectionCopies, nn.Module):
    def __init__(self, weight: torch.Tensor, plan: LayerPlan) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.set_plan(plan, {})


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
    layer = _Projection(weight, LayerPlan((PlanStep(ANY_ROWS, DENSE, TILE),)))
    assert torch.equal(layer.project(x, bias), expected)


@pytest.mark.skipif(build_copy(PACKED, torch.ones(2, 2)) is None, reason="oneDNN cannot prepack here")
def test_the_plan_picks_the_copy_by_rows_and_packed_weights_follow_updates() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=generator)
    layer = _Projection(weight, LayerPlan((PlanStep(4, DENSE), PlanStep(ANY_ROWS, PACKED))))
    assert set(layer.copies) == {DENSE, PACKED}
    for rows in (1, 4, 5, 40):
        x = torch.randn(rows, 64, generator=generator)
        torch.testing.assert_close(layer.project(x), F.linear(x, weight))
    layer.weight.data.mul_(-2.0)  # a weight update writes in place, then refreshes the copies
    layer.refresh_copies()
    x = torch.randn(9, 64, generator=generator)
    torch.testing.assert_close(layer.project(x), F.linear(x, layer.weight))
    layer.release_copies()
    assert set(layer.copies) == {DENSE}
    layer.rebuild_copies()
    torch.testing.assert_close(layer.project(x), F.linear(x, layer.weight))
