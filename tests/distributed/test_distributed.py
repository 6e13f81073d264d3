"""Tensor and pipeline parallelism over torch.distributed (gloo, CPU processes).

Parity: each layout must give transformers' logits within test_parity's
tolerance (float32; max |diff| <= 1e-4 x the logit scale at every position)
and the same greedy tokens, with chunked prefill (16-token steps) and, on
a second pass over the same prompts, prefix-cache hits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from hawker import LLM, SamplingParams
from hawker.distributed.pipeline import split_micro_batches
from hawker.engine.errors import EngineFatalError
from hawker.engine.loading import load_watching
from hawker.layers.linear import ColumnParallelLinear
from hawker.layers.parallel import PPInfo, TPInfo
from hawker.step import ScheduledSeq
from tests.support.parity import assert_parity, make_prompts, reference_generate, run_hawker
from tests.support.processes import children, live_command
from tests.support.server_process import ServerProcess, launch, wait_ready
from tests.support.tiny_models import checkpoint_state

NEW_TOKENS = 8


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2), (2, 2)])
def test_parallel_layouts_keep_parity(tiny_checkpoints: dict[str, Path], tp: int, pp: int) -> None:
    arch = "qwen3" if tp * pp == 4 else "llama"  # qwen3: q/k norms and an explicit head_dim
    prompts = make_prompts(seed=3)[2:5]
    # 8 new tokens, not the parity tests' 32: each step crosses processes (the suite's slowest tests).
    reference = reference_generate(tiny_checkpoints[arch], prompts, NEW_TOKENS)
    with LLM(
        str(tiny_checkpoints[arch]),
        dtype="float32",
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        max_num_batched_tokens=16,
        block_size=4,
    ) as llm:
        tokens, logits = run_hawker(llm, prompts, NEW_TOKENS)
        assert_parity(reference, tokens, logits)
        hits_before = llm.engine.stats().prefix_cache_hits
        tokens, logits = run_hawker(llm, prompts, NEW_TOKENS)  # the prompts' blocks are cached now
        assert_parity(reference, tokens, logits)
        assert llm.engine.stats().prefix_cache_hits > hits_before
        llm.engine.kv.check_invariants()


def test_kv_heads_are_replicated_over_more_ranks() -> None:
    # 2 KV heads of 3 dims over 4 ranks: ranks 0-1 hold head 0, ranks 2-3 head 1.
    q_size, kv_size = 4 * 3, 2 * 3
    full = torch.arange((q_size + 2 * kv_size) * 5, dtype=torch.float32).reshape(-1, 5)
    q, k, v = full.split([q_size, kv_size, kv_size])
    for rank in range(4):
        tp = TPInfo(rank, 4)
        heads = tp.heads(2)
        layer = ColumnParallelLinear(5, (q_size, kv_size, kv_size), False, tp, torch.float32, (4, 2, 2))
        for shard, tensor in enumerate((q, k, v)):
            layer.load("weight", tensor, shard)
        head = rank // 2
        assert heads.local == 1 and heads.part == head
        expected = torch.cat((q[rank * 3 : rank * 3 + 3], k[head * 3 : head * 3 + 3], v[head * 3 : head * 3 + 3]))
        assert torch.equal(layer.weight.data, expected)
    with pytest.raises(ValueError, match="replicated"):
        TPInfo(0, 4).heads(3)


def test_pipeline_stages_cover_the_layers_once() -> None:
    for layers, stages in [(2, 2), (7, 3), (32, 4)]:
        ranges = [PPInfo(rank, stages).layer_range(layers) for rank in range(stages)]
        assert [i for r in ranges for i in r] == list(range(layers))
        assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_micro_batches_keep_order_and_balance_tokens() -> None:
    params = SamplingParams()
    seqs = [ScheduledSeq(str(i), (1,) * n, 0, (0,), True, params, 0, 0, n) for i, n in enumerate([8, 1, 1, 6, 2, 1])]
    runs = split_micro_batches(seqs, 2)
    assert [s for run in runs for s in run] == seqs
    assert [sum(s.num_tokens for s in run) for run in runs] == [10, 9]
    assert len(split_micro_batches(seqs[:1], 4)) == 1
    assert split_micro_batches([], 2) == []


def _wait_exit(process: subprocess.Popen, seconds: float) -> int | None:
    try:
        return process.wait(seconds)
    except subprocess.TimeoutExpired:
        return None


def test_a_dead_rank_stops_the_server_and_a_dead_server_stops_its_ranks(
    tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    server = launch(tiny_checkpoints["llama"], tmp_path / "tp.log", "--tensor-parallel-size", "2")
    try:
        wait_ready(server)
        (worker,) = children(server.process.pid)
        os.kill(worker, signal.SIGKILL)
        started = time.monotonic()
        saw_unhealthy = False
        while server.process.poll() is None and time.monotonic() - started < 20:
            with contextlib.suppress(httpx.TransportError):  # the server may be gone already
                saw_unhealthy |= httpx.get(f"{server.base_url}/health", timeout=2).status_code == 503
            time.sleep(0.2)
        code = _wait_exit(server.process, 1)
        assert code is not None and code != 0, f"the server did not exit non-zero:\n{server.log()}"
        assert time.monotonic() - started < 20
        assert saw_unhealthy, "/health never reported the dead rank"
    finally:
        server.stop()
    # The other way round: the driver dies without a word; its worker must not outlive it.
    orphan_check: ServerProcess = launch(tiny_checkpoints["llama"], tmp_path / "tp2.log", "--tensor-parallel-size", "2")
    try:
        wait_ready(orphan_check)
        (worker,) = children(orphan_check.process.pid)
        orphan_check.process.kill()
        orphan_check.process.wait(5)
        deadline = time.monotonic() + 10
        while live_command(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not live_command(worker), "the worker rank outlived its driver"
    finally:
        orphan_check.stop()


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2)])
def test_every_rank_takes_a_weight_update(
    tiny_checkpoints: dict[str, Path], trained_llama: Path, tp: int, pp: int
) -> None:
    prompts = make_prompts(seed=5)[:3]
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    options = {"dtype": "float32", "block_size": 4, "compile_decode_max_rows": 0}
    with LLM(str(trained_llama), **options) as reference:
        want = [list(o.outputs[0].token_ids) for o in reference.generate(prompts, greedy, use_tqdm=False)]
    with LLM(str(tiny_checkpoints["llama"]), tensor_parallel_size=tp, pipeline_parallel_size=pp, **options) as llm:
        before = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy, use_tqdm=False)]
        assert before != want
        with pytest.raises(ValueError, match="no_such_weight"):  # refused by every rank, nothing written
            llm.update_weights([("model.layers.0.no_such_weight", torch.zeros(2))])
        state = checkpoint_state(trained_llama)
        if pp == 2:
            # Good for the driver's stage, wrong for the last stage's: the last stage refuses, so neither
            # writes (every rank checks before any writes).
            last = max(int(name.split(".")[2]) for name in state if name.startswith("model.layers."))
            mixed = [
                ("model.layers.0.mlp.down_proj.weight", state["model.layers.0.mlp.down_proj.weight"]),
                (f"model.layers.{last}.mlp.down_proj.weight", torch.zeros(3, 3)),
            ]
            with pytest.raises(ValueError, match="another rank refused"):
                llm.update_weights(mixed)
        assert llm.weight_version == 0
        assert [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy, use_tqdm=False)] == before
        assert llm.update_weights(state.items()) == 1  # full tensors; each rank its shard
        outputs = llm.generate(prompts, greedy, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outputs] == want
        assert {o.weight_version for o in outputs} == {1}


class _RankDiesSoon:
    """Ranks of which one dies 0.3 s after start, before it could join (as a RankGroup)."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def dead(self) -> str | None:
        return "rank 1 (pid 42) exited with code 1" if time.monotonic() - self.started > 0.3 else None

    def stop(self, timeout: float = 10.0) -> None:
        del timeout

    def kill(self) -> None:
        pass


def test_rank_0_stops_waiting_for_a_rank_that_died_before_joining() -> None:
    never_joins = threading.Event()
    started = time.monotonic()
    with pytest.raises(EngineFatalError, match=r"while the engine started: rank 1 \(pid 42\) exited"):
        load_watching(_RankDiesSoon(), never_joins.wait)  # type: ignore[arg-type]
    assert time.monotonic() - started < 5  # not init_process_group's 120 s
    never_joins.set()
    # A load that finishes, or fails on its own, is returned or raised as it is.
    assert load_watching(_RankDiesSoon(), lambda: "shard") == "shard"  # type: ignore[arg-type,comparison-overlap]

    def fails() -> None:
        raise ValueError("bad checkpoint")

    with pytest.raises(ValueError, match="bad checkpoint"):
        load_watching(_RankDiesSoon(), fails)  # type: ignore[arg-type]
