"""Measured matmul plans kept on disk: reused on the same machine and options, measured again otherwise.

Each test points ``HAWKER_KERNEL_CACHE`` at its own folder and counts the
measurements ``plan_projections`` makes (one per group of layers).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from hawker.config import MatmulOptions
from hawker.layers import plan_cache, projection, quant, weight_copies
from hawker.layers.matmul_plan import ANY_ROWS, LayerPlan, PlanStep
from hawker.layers.projection import plan_projections
from hawker.layers.weight_copies import DENSE, INT4, Recipe, RecipeFinder, WeightCopy
from tests.support.matmul import TwoProjections, grid_weight  # two projections of different shapes: two groups

OPTIONS = MatmulOptions(max_rows=64, repeats=1)


def _plans(model: TwoProjections) -> list[LayerPlan | None]:
    return [model.up.plan, model.down.plan]


@pytest.fixture
def measurements(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the measurement, with the cache in a fresh folder."""
    monkeypatch.setenv("HAWKER_KERNEL_CACHE", str(tmp_path / "kernels"))
    calls: list[int] = []
    measured = projection._measured_plan

    def counting(*args, **kwargs) -> LayerPlan:  # type: ignore[no-untyped-def]
        calls.append(1)
        return measured(*args, **kwargs)

    monkeypatch.setattr(projection, "_measured_plan", counting)
    return calls


def test_a_second_start_reuses_the_plans_the_first_measured(measurements: list[int]) -> None:
    first = TwoProjections()
    plan_projections(first, OPTIONS)
    assert len(measurements) == 2
    assert len(list(plan_cache.plan_dir().glob("*.json"))) == 2
    second = TwoProjections()
    plan_projections(second, OPTIONS)
    assert len(measurements) == 2  # nothing measured again
    assert _plans(second) == _plans(first)
    x = torch.randn(5, 64).bfloat16()
    assert torch.equal(second.up.project(x), first.up.project(x))


def test_other_bounds_are_measured_apart(measurements: list[int]) -> None:
    plan_projections(TwoProjections(), OPTIONS)
    plan_projections(TwoProjections(), replace(OPTIONS, max_rows=32))
    plan_projections(TwoProjections(), replace(OPTIONS, consistent=True))
    assert len(measurements) == 6
    assert len(list(plan_cache.plan_dir().glob("*.json"))) == 6


def test_off_measures_every_time_and_keeps_nothing(measurements: list[int]) -> None:
    for _ in range(2):
        plan_projections(TwoProjections(), replace(OPTIONS, cache="off"))
    assert len(measurements) == 4
    assert not plan_cache.plan_dir().exists()


def test_refresh_measures_again_and_replaces_the_kept_plan(measurements: list[int]) -> None:
    plan_projections(TwoProjections(), OPTIONS)
    files = sorted(plan_cache.plan_dir().glob("*.json"))
    fake = LayerPlan((PlanStep(ANY_ROWS, DENSE, 16),))  # tiles: never what an unconstrained plan measures
    for path in files:
        path.write_text(json.dumps({"steps": [asdict(step) for step in fake.steps]}))
    refreshed = TwoProjections()
    plan_projections(refreshed, replace(OPTIONS, cache="refresh"))
    assert len(measurements) == 4
    assert sorted(plan_cache.plan_dir().glob("*.json")) == files  # the same keys: "refresh" is not a bound
    reused = TwoProjections()
    plan_projections(reused, OPTIONS)
    assert len(measurements) == 4
    assert fake not in _plans(refreshed)
    assert _plans(reused) == _plans(refreshed)


def test_an_unreadable_or_unusable_plan_is_measured_again(
    measurements: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    plan_projections(TwoProjections(), OPTIONS)
    broken, foreign = sorted(plan_cache.plan_dir().glob("*.json"))
    broken.write_text("{not json")
    # A kernel this group has no copy for (bfloat16 weights from floats have no int4 form).
    foreign.write_text(
        '{"steps": [{"max_rows": 4, "kernel": "int4", "tile": 0}, ' + '{"max_rows": 9, "kernel": "dense", "tile": 0}]}'
    )
    with caplog.at_level(logging.WARNING, logger="hawker.layers.plan_cache"):
        model = TwoProjections()
        plan_projections(model, OPTIONS)
    assert len(measurements) == 4
    assert "unreadable matmul plan" in caplog.text
    assert all(plan is not None and INT4 not in plan.kernels for plan in _plans(model))


def test_the_key_names_machine_software_group_and_bounds() -> None:
    weight = torch.zeros(96, 64, dtype=torch.bfloat16)
    key = plan_cache.plan_key(False, weight, [DENSE], OPTIONS, 64)
    assert key == plan_cache.plan_key(False, weight, [DENSE], replace(OPTIONS, cache="refresh"), 64)
    others = [
        plan_cache.plan_key(True, weight, [DENSE], OPTIONS, 64),
        plan_cache.plan_key(False, weight.T, [DENSE], OPTIONS, 64),
        plan_cache.plan_key(False, weight.float(), [DENSE], OPTIONS, 64),
        plan_cache.plan_key(False, weight, [DENSE, INT4], OPTIONS, 64),
        plan_cache.plan_key(False, weight, [DENSE], replace(OPTIONS, int4_max_rows=8), 64),
        plan_cache.plan_key(False, weight, [DENSE], OPTIONS, 128),
    ]
    assert len({key, *others}) == 1 + len(others)


def test_a_stored_plan_reads_back_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAWKER_KERNEL_CACHE", str(tmp_path))
    plan = LayerPlan((PlanStep(16, INT4), PlanStep(ANY_ROWS, DENSE, 64)))
    plan_cache.store("k", plan)
    assert plan_cache.load("k") == plan
    assert plan_cache.load("missing") is None


def test_prepare_measures_what_a_later_start_reuses(
    tiny_checkpoints: dict[str, Path], measurements: list[int], capsys: pytest.CaptureFixture[str]
) -> None:
    from hawker.cli import main
    from hawker.llm import LLM

    checkpoint = str(tiny_checkpoints["llama"])
    assert main(["prepare", checkpoint, "--dtype", "bfloat16", "--kv-cache-memory-gb", "0.05"]) == 0
    assert "prepared in" in capsys.readouterr().out
    prepared = len(measurements)
    assert prepared > 0 and len(list(plan_cache.plan_dir().glob("*.json"))) == prepared
    # Serve's defaults (prefix caching on: consistent numerics; 128 sequences, where the offline LLM's default
    # is 256) as prepare had them: nothing measured again.
    llm = LLM(checkpoint, dtype="bfloat16", kv_cache_memory_gb=0.05, compile_decode_max_rows=0, max_num_seqs=128)
    assert len(measurements) == prepared
    llm.close()


def test_a_start_from_kept_plans_makes_only_the_copies_they_use(
    measurements: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding which forms a weight has makes none of them: a start whose plans are on disk makes the copies
    those plans use, and each weight's 4-bit grid is found once whatever number of forms start from it."""
    generator = torch.Generator().manual_seed(5)
    grid_model = TwoProjections()
    grid_model.up.load("weight", grid_weight(96, 64, generator))
    grid_model.down.load("weight", grid_weight(64, 96, generator))
    plan_projections(grid_model, OPTIONS)
    made: list[str] = []
    for kernel, recipe in list(weight_copies.RECIPES.items()):
        monkeypatch.setitem(weight_copies.RECIPES, kernel, _counting(kernel, recipe, made))
    grids_found: list[int] = []
    find_grid = quant.int4_grid
    monkeypatch.setattr(quant, "int4_grid", lambda weight: grids_found.append(1) or find_grid(weight))
    second = TwoProjections()
    second.up.load("weight", grid_model.up.weight.data.float())
    second.down.load("weight", grid_model.down.weight.data.float())
    plan_projections(second, OPTIONS)
    assert len(measurements) == 2  # from the cache
    used = sorted(kernel for layer in (second.up, second.down) for kernel in layer.copies)
    assert sorted(made) == used
    assert len(grids_found) == 2  # one per weight


def _counting(kernel: str, recipe: RecipeFinder, made: list[str]) -> RecipeFinder:
    def finder(weight: torch.Tensor, grids: quant.WeightGrids) -> Recipe | None:
        found = recipe(weight, grids)
        if found is None:
            return None

        def make() -> WeightCopy:
            made.append(kernel)
            return found()

        return make

    return finder
