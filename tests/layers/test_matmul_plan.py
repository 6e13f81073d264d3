"""The measured matmul plan: fastest copy per row count, forced ranges, and consistent numerics' rules.

Timings are given (not measured) so that every choice is known; the
invariance probe runs on real or deliberately row-dependent copies.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hawker.config import MatmulOptions
from hawker.layers import matmul_plan
from hawker.layers.matmul_plan import (
    ANY_ROWS,
    CONSISTENT_DECODE_ROWS,
    ROW_COUNTS,
    LayerPlan,
    PlanStep,
    Timings,
    consistent_plan,
    plan_from_choices,
    rows_invariant,
    speed_plan,
)
from hawker.layers.projection import plan_projections
from hawker.layers.weight_copies import AMX, AMXQ4, DENSE, FP32, INT4, PACKED
from tests.support.matmul import TwoProjections


class _RowCountDependent:
    """A copy whose rows change with the number of rows it is given (as oneDNN's can)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + 1e-3 * x.shape[0]


class _RowWise:
    """A copy that multiplies row by row: invariant by construction."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([F.linear(row, self.weight) for row in x]) if len(x) else x.new_empty(0, len(self.weight))


def _timings(per_kernel: dict[str, dict[int, float]]) -> Timings:
    return Timings(per_kernel)


def _flat(seconds_per_row: float, fixed: float = 0.0) -> dict[int, float]:
    return {rows: fixed + seconds_per_row * rows for rows in ROW_COUNTS}


def test_plan_steps_choose_by_rows_and_say_where_they_change() -> None:
    plan = plan_from_choices(lambda rows: (INT4, 0) if rows <= 4 else (PACKED, 0), 300)
    assert plan.steps == (PlanStep(4, INT4), PlanStep(ANY_ROWS, PACKED))
    assert [plan.choose(rows).kernel for rows in (1, 4, 5, 10_000)] == [INT4, INT4, PACKED, PACKED]
    assert plan.change_rows == [5] and plan.kernels == {INT4, PACKED}
    assert plan.describe() == "int4 [1-4], packed [5-]"


def test_speed_plan_takes_the_fastest_per_row_count_unless_the_preferred_is_close() -> None:
    timings = _timings(
        {
            PACKED: _flat(1.0, fixed=10.0),  # preferred; slow for few rows
            DENSE: _flat(1.02, fixed=10.0),  # within MIN_GAIN of packed everywhere: never chosen
            INT4: {rows: 2.0 * rows + 1.0 for rows in ROW_COUNTS if rows <= 32},  # fast for few rows
        }
    )
    plan = speed_plan(timings, [PACKED, DENSE, INT4], MatmulOptions(), limit=2048)
    # int4: 3 s at 1 row against 11; 17 at 8 against 18 (5.6 % faster); 33 at 16 against 26.
    assert plan.steps == (PlanStep(8, INT4), PlanStep(ANY_ROWS, PACKED))


def test_forced_ranges_override_the_measurements() -> None:
    timings = _timings({PACKED: _flat(1.0), INT4: _flat(0.5), FP32: _flat(0.1)})
    options = MatmulOptions(int4_max_rows=3, fp32_min_rows=100)
    plan = speed_plan(timings, [PACKED, INT4, FP32], options, limit=2048)
    assert [plan.choose(rows).kernel for rows in (1, 3, 4, 99, 100, 5000)] == [INT4, INT4, PACKED, PACKED, FP32, FP32]


def test_row_invariance_probe_tells_row_dependent_kernels_apart() -> None:
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(24, 16, generator=generator), torch.randn(300, 16, generator=generator)
    counts = matmul_plan.probe_counts(1, 300)
    assert counts[:3] == [1, 2, 3] and counts[-1] == 300
    assert rows_invariant(_RowWise(weight), x, counts)
    assert not rows_invariant(_RowCountDependent(weight), x, counts)


def test_consistent_plan_tiles_a_row_dependent_kernel_and_keeps_an_invariant_one_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(matmul_plan.BUILDERS, PACKED, _RowCountDependent)
    monkeypatch.setitem(matmul_plan.BUILDERS, DENSE, _RowWise)
    weight = torch.randn(24, 16, generator=torch.Generator().manual_seed(1))
    # The row-dependent kernel is 3x the faster: it wins for large steps, but only on fixed tiles (of more
    # than the decode-sized range, which ends at 16 rows); for few rows its tiles would waste more than 3x.
    fast_packed = _timings({PACKED: _flat(1.0), DENSE: _flat(3.0)})
    plan = consistent_plan(weight, [PACKED, DENSE], fast_packed, MatmulOptions(consistent=True), 512)
    assert plan.steps == (PlanStep(CONSISTENT_DECODE_ROWS, DENSE), PlanStep(ANY_ROWS, PACKED, 32))
    # Nearly as fast untiled and invariant: no tiles, one copy for every row count.
    close = _timings({PACKED: _flat(1.0), DENSE: _flat(1.01)})
    plan = consistent_plan(weight, [PACKED, DENSE], close, MatmulOptions(consistent=True), 512)
    assert plan.steps == (PlanStep(ANY_ROWS, DENSE),)


def test_consistent_plan_takes_a_few_row_copy_up_to_the_decode_range_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # The LM head's plan too: int4 (timed up to 32 rows) for decode-sized steps, dense beyond.
    monkeypatch.setitem(matmul_plan.BUILDERS, DENSE, _RowWise)
    monkeypatch.setitem(matmul_plan.BUILDERS, INT4, _RowWise)
    weight = torch.randn(24, 16, generator=torch.Generator().manual_seed(2))
    timings = _timings({DENSE: _flat(1.0, fixed=50.0), INT4: {r: 5.0 * r for r in ROW_COUNTS if r <= 32}})
    plan = consistent_plan(weight, [DENSE, INT4], timings, MatmulOptions(consistent=True), 128)
    assert plan.steps == (PlanStep(CONSISTENT_DECODE_ROWS, INT4), PlanStep(ANY_ROWS, DENSE))


def test_consistent_plans_switch_between_copies_of_the_same_bits_by_speed() -> None:
    # The 4-bit AMX copy has the bfloat16 AMX copy's bits: a consistent range may take whichever is faster at
    # each row count (here the 4-bit one from 17 to 256 rows, the bfloat16 one beyond); a copy without such
    # a twin, or a tiled one, keeps its whole range.
    fast_small = {rows: 0.5 * rows if rows <= 256 else 2.0 * rows for rows in ROW_COUNTS}
    timings = _timings({AMX: _flat(1.0), AMXQ4: fast_small, DENSE: _flat(1.0)})
    kernels = [DENSE, AMX, AMXQ4]
    first = CONSISTENT_DECODE_ROWS + 1
    assert matmul_plan._same_bits_by_speed((AMX, 0), timings, kernels, first, ANY_ROWS) == [
        PlanStep(256, AMXQ4),
        PlanStep(ANY_ROWS, AMX),
    ]
    assert matmul_plan._same_bits_by_speed((AMXQ4, 0), timings, kernels, 1, CONSISTENT_DECODE_ROWS) == [
        PlanStep(CONSISTENT_DECODE_ROWS, AMXQ4)
    ]
    assert matmul_plan._same_bits_by_speed((AMX, 0), timings, [DENSE, AMX], first, ANY_ROWS) == [
        PlanStep(ANY_ROWS, AMX)
    ]  # the twin not allowed
    assert matmul_plan._same_bits_by_speed((DENSE, 0), timings, kernels, first, ANY_ROWS) == [PlanStep(ANY_ROWS, DENSE)]
    assert matmul_plan._same_bits_by_speed((AMX, 32), timings, kernels, first, ANY_ROWS) == [
        PlanStep(ANY_ROWS, AMX, 32)
    ]


@pytest.mark.parametrize("consistent", [False, True])
def test_measured_plans_compute_the_same_products(consistent: bool) -> None:
    model = TwoProjections()
    described = plan_projections(model, MatmulOptions(consistent=consistent, max_rows=256, repeats=1))
    assert len(described) == 2
    for layer in (model.up, model.down):
        assert isinstance(layer.plan, LayerPlan)
        for rows in (1, 7, 40, 300):
            x = torch.randn(rows, layer.weight.shape[1]).bfloat16()
            expected = F.linear(x.float(), layer.weight.float())
            torch.testing.assert_close(layer.project(x).float(), expected, atol=0.1, rtol=0.02)


def test_weights_a_step_reads_from_memory_are_timed_with_the_caches_emptied(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every timed pass reads a last-level-cache-sized buffer first: at every row count for the LM head (read
    # once a step, after everything else), at decode-sized row counts (<= COLD_ROWS) for a group of layers;
    # never for weights that all together stay under COLD_WEIGHT_BYTES (they would stay in the caches anyway).
    reads: list[int] = []
    real_sum = torch.Tensor.sum

    def counting_sum(self: torch.Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        reads.append(self.numel() * self.element_size())
        return real_sum(self, *args, **kwargs)

    monkeypatch.setattr(matmul_plan, "_last_level_cache_bytes", lambda: 2**20)
    monkeypatch.setattr(matmul_plan, "COLD_ROWS", 2)
    monkeypatch.setattr(torch.Tensor, "sum", counting_sum)
    weight = torch.randn(64, 32)
    copies = {DENSE: [matmul_plan.BUILDERS[DENSE](weight)] * 2}
    monkeypatch.setattr(matmul_plan, "COLD_WEIGHT_BYTES", 2 * weight.numel() * weight.element_size())
    timings = matmul_plan.measure(weight, copies, 4, repeats=2, read_once=False)
    assert reads == [2**20] * 2 * 2 and set(timings.seconds[DENSE]) == {1, 2, 4}  # 2 passes x rows 1, 2
    reads.clear()
    monkeypatch.setattr(matmul_plan, "COLD_WEIGHT_BYTES", weight.numel() * weight.element_size())
    matmul_plan.measure(weight, {DENSE: copies[DENSE][:1]}, 4, repeats=2, read_once=True)
    assert reads == [2**20] * 2 * 3  # 2 passes x 3 row counts
    reads.clear()
    monkeypatch.setattr(matmul_plan, "COLD_WEIGHT_BYTES", 2 * weight.numel() * weight.element_size() + 1)
    matmul_plan.measure(weight, copies, 4, repeats=2, read_once=False)
    matmul_plan.measure(weight, {DENSE: copies[DENSE][:1]}, 4, repeats=2, read_once=True)
    assert reads == []


def test_the_last_level_cache_size_is_read_or_defaulted() -> None:
    assert matmul_plan._last_level_cache_bytes() >= 2**20
