"""The torch.compile'd decode path keeps logit parity and compiles nothing after start-up."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

from hawker import LLM
from hawker.config import KV_CACHE_DTYPES
from hawker.engine.compiled_decode import can_compile_on_cpu, rows_within_graph_budget, warm_up_row_counts
from hawker.layers.matmul_plan import ANY_ROWS, LayerPlan, PlanStep
from hawker.layers.weight_copies import DENSE, INT4
from tests.support.parity import (
    FP8_RELATIVE_TOLERANCE,
    NUM_NEW_TOKENS,
    RELATIVE_TOLERANCE,
    Reference,
    assert_parity,
    make_prompts,
    reference_generate,
    rounding_reference,
    run_hawker,
)

MAX_ROWS = 8


def test_warm_up_covers_the_row_counts_where_a_graph_changes() -> None:
    assert warm_up_row_counts(16, branches := (17, 32)) == [1, 2, 16]
    assert warm_up_row_counts(64, branches) == [1, 2, 17, 32, 64]
    assert warm_up_row_counts(1, (0,)) == [1]


@pytest.fixture
def dynamo_enabled() -> Iterator[None]:
    # conftest turns torch.compile off for the rest of the suite.
    with torch._dynamo.config.patch(disable=False):
        assert can_compile_on_cpu(), "the compiled decode path needs a C++ compiler (g++) on PATH"
        yield


@pytest.mark.usefixtures("dynamo_enabled")
@pytest.mark.parametrize(
    ("arch", "options"),
    [("llama", {"compile_cpp_wrapper": True}), ("qwen3", {"compile_cpp_wrapper": False, "kv_cache_dtype": "fp8"})],
)
def test_compiled_decode_keeps_parity_with_transformers(
    arch: str, options: dict[str, Any], tiny_checkpoints: dict[str, Path]
) -> None:
    # Each wrapper once (inductor's C++ wrapper, the default, builds for ~10 s more a graph); the second
    # with an 8-bit KV cache too, against transformers rounding its cache alike.
    check_compiled_parity(tiny_checkpoints[arch], **options)


@pytest.mark.usefixtures("dynamo_enabled")
def test_models_of_one_shape_in_one_process_run_their_own_graphs(grid_checkpoint: Path) -> None:
    # Same shapes, different modules (int4 copies or not): the second model
    # must not run the first one's graph (the module guards are skipped).
    check_compiled_parity(grid_checkpoint, int4_decode_max_rows=MAX_ROWS, compile_cpp_wrapper=False)
    check_compiled_parity(grid_checkpoint, int4_decode_max_rows=0, compile_cpp_wrapper=False)


def check_compiled_parity(checkpoint: Path, **options: Any) -> None:
    prompts = make_prompts(seed=5)  # 8 prompts: their decode steps have 8 rows, then fewer
    cache_dtype = KV_CACHE_DTYPES[options.get("kv_cache_dtype", "auto")]

    def reference_of(prompts: list[list[int]]) -> Reference:
        if cache_dtype is None:
            return reference_generate(checkpoint, prompts)
        return rounding_reference(checkpoint, prompts, cache_dtype, NUM_NEW_TOKENS)

    reference = reference_of(prompts)
    llm = LLM(str(checkpoint), dtype="float32", compile_decode_max_rows=MAX_ROWS, **options)
    compiled = llm.engine.runner.compiled_decode
    assert compiled is not None
    graphs_after_warm_up = counters["stats"]["unique_graphs"]
    calls = 0
    original = compiled._forward

    def counting(*args):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return original(*args)

    compiled._forward = counting
    tokens, logits = run_hawker(llm, prompts)
    single_tokens, single_logits = run_hawker(llm, prompts[:1])
    assert calls > 0
    assert counters["stats"]["unique_graphs"] == graphs_after_warm_up, "a step compiled a new graph mid-run"
    tolerance = RELATIVE_TOLERANCE if cache_dtype is None else FP8_RELATIVE_TOLERANCE
    assert_parity(reference, tokens, logits, tolerance)
    assert_parity(reference_of(prompts[:1]), single_tokens, single_logits, tolerance)


def test_compile_option_is_validated() -> None:
    with pytest.raises(ValueError, match="compile_decode_max_rows"):
        LLM(dtype="float32", compile_decode_max_rows=-1)


def test_tiled_plans_warm_up_every_number_of_full_tiles() -> None:
    plan = LayerPlan((PlanStep(16, INT4), PlanStep(ANY_ROWS, DENSE, 32)))
    # 17 (the copy changes), then each count of full tiles with and without a padded rest.
    assert plan.graph_rows(100) == [17, 32, 33, 64, 65, 96, 97]
    assert warm_up_row_counts(100, plan.graph_rows(100)) == [1, 2, 17, 32, 33, 64, 65, 96, 97, 100]
    assert plan.graph_rows(40) == [17, 32, 33]
    assert LayerPlan((PlanStep(ANY_ROWS, DENSE),)).graph_rows(100) == []


def test_a_plan_that_branches_often_compiles_fewer_rows() -> None:
    plan = LayerPlan((PlanStep(16, INT4), PlanStep(ANY_ROWS, DENSE, 16)))
    branches = plan.graph_rows(256)
    # Graphs at 1, 2, 17, 32, 33 and 48 rows fill the budget; 49 (three tiles and a rest) would be a 7th.
    bound = rows_within_graph_budget(256, branches, graphs=6)
    assert bound == 48 and warm_up_row_counts(bound, branches) == [1, 2, 17, 32, 33, 48]
    assert rows_within_graph_budget(128, [17], graphs=6) == 128


def test_the_cpp_wrapper_switch_reaches_the_engine() -> None:
    from hawker.cli import _engine_kwargs, build_parser
    from hawker.options import EngineOptions

    parser = build_parser()
    assert EngineOptions().compile_cpp_wrapper
    assert _engine_kwargs(parser.parse_args(["serve"]))["compile_cpp_wrapper"] is True
    assert _engine_kwargs(parser.parse_args(["serve", "--no-compile-cpp-wrapper"]))["compile_cpp_wrapper"] is False
