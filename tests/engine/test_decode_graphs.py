"""Decode-step CUDA graphs: the batch-size ladder, and the static-buffer path on CPU.

Without a GPU nothing can be captured, so the runner's graphs run in
``capture="eager"`` mode: the same static buffers, padding rows and fixed
metadata as a replay, with the forward run instead of the graph. Parity
with transformers then shows that padding and staging change no logit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from hawker import LLM
from hawker.engine.decode_graphs import graph_batch_sizes
from hawker.step import ScheduledSeq
from tests.support.parity import assert_parity, make_prompts, reference_generate, run_hawker


def test_graph_batch_sizes_ladder() -> None:
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(3) == [1, 2, 3]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(32) == [1, 2, 4, 8, 16, 24, 32]


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlap"])
def test_padded_static_decode_path_keeps_parity(tiny_checkpoints: dict[str, Path], overlap: bool) -> None:
    # Three prompts decode together: steps of 3 rows padded to the captured 4. With
    # overlap scheduling each step's input ids are the previous step's tokens, on the device.
    prompts = make_prompts(seed=11)[1:4]
    # 8 new tokens, not the parity tests' 32: every step runs in Triton's interpreter (~1 s a step).
    reference = reference_generate(tiny_checkpoints["llama"], prompts, new_tokens=8)
    # A short max_model_len keeps the fixed split count (and the interpreter's work) small.
    llm = LLM(
        str(tiny_checkpoints["llama"]),
        dtype="float32",
        attention_backend="triton",
        block_size=16,
        max_model_len=96,
        overlap_scheduling=overlap,
    )
    runner = llm.engine.runner
    graphs = runner.decode_graphs_for(max_rows=4, capture="eager")
    graphs.capture_all()
    replayed: list[int] = []
    run = graphs.run

    def counting_run(rows: Sequence[ScheduledSeq], fill_input_ids: Callable[[torch.Tensor], None]) -> torch.Tensor:
        replayed.append(len(rows))
        return run(rows, fill_input_ids)

    graphs.run = counting_run
    runner.decode_graphs = graphs
    tokens, logits = run_hawker(llm, prompts, new_tokens=8)
    assert_parity(reference, tokens, logits)
    assert 3 in replayed, "the decode steps did not go through the graphs' static buffers"
    llm.engine.kv.check_invariants()


def test_cuda_graphs_need_cuda(tiny_checkpoints: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="cuda_graph_max_batch_size"):
        LLM(str(tiny_checkpoints["llama"]), dtype="float32", attention_backend="triton", cuda_graph_max_batch_size=8)
    with pytest.raises(ValueError, match="cuda_graph_max_batch_size"):
        LLM(str(tiny_checkpoints["llama"]), dtype="float32", cuda_graph_max_batch_size=-1)
