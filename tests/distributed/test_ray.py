"""Tensor parallelism through the Ray executor on a local two-node cluster (ray.cluster_utils.Cluster).

Each simulated node has one CPU and every rank reserves one, so the two
ranks of TP=2 land on different nodes; steps and collectives still go over
torch.distributed (gloo).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.cluster_utils import Cluster

from hawker import LLM, SamplingParams
from hawker.engine.errors import EngineFatalError

PROMPTS = [[5, 9, 14, 3, 22, 7], [40, 2, 2, 17], [8, 31, 12, 6, 6, 19, 44, 3, 1]]
PARAMS = SamplingParams(temperature=0.0, max_tokens=8, logprobs=2, ignore_eos=True)


@pytest.fixture(scope="module")
def two_node_cluster() -> Iterator[Cluster]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _engine(checkpoint: Path, **options: Any) -> LLM:
    return LLM(str(checkpoint), dtype="float32", block_size=4, compile_decode_max_rows=0, **options)


def _tokens_and_logprobs(llm: LLM) -> tuple[list[list[int]], list[list[float]]]:
    outputs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    tokens = [list(out.outputs[0].token_ids) for out in outputs]
    logprobs = []
    for out in outputs:
        entries = out.outputs[0].logprobs
        assert entries is not None
        logprobs.append([entry[token].logprob for token, entry in zip(out.outputs[0].token_ids, entries, strict=True)])
    return tokens, logprobs


def test_tp2_over_ray_actors_matches_one_process(tiny_checkpoints: dict[str, Path], two_node_cluster: Cluster) -> None:
    with _engine(tiny_checkpoints["llama"]) as single:
        want_tokens, want_logprobs = _tokens_and_logprobs(single)
    with _engine(tiny_checkpoints["llama"], tensor_parallel_size=2, distributed_executor_backend="ray") as llm:
        ranks = llm.engine.runner.workers
        nodes = ray.util.placement_group_table(ranks.placement)["bundles_to_node_id"]
        assert nodes[0] == ray.get_runtime_context().get_node_id()  # bundle 0 is the driver's node
        assert nodes[1] != nodes[0]  # rank 1 runs on the other simulated node
        tokens, logprobs = _tokens_and_logprobs(llm)
    assert tokens == want_tokens
    for got, want in zip(logprobs, want_logprobs, strict=True):
        assert got == pytest.approx(want, abs=1e-4)  # float32; TP=2 only reorders the sums
    # close() killed the actors and freed the placement group: the cluster's CPUs are free again.
    deadline = time.monotonic() + 10
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0) == 2


def test_a_killed_rank_actor_fails_the_engine_and_names_the_rank(
    tiny_checkpoints: dict[str, Path], two_node_cluster: Cluster
) -> None:
    llm = _engine(tiny_checkpoints["llama"], tensor_parallel_size=2, distributed_executor_backend="ray")
    try:
        assert llm.generate(PROMPTS[:1], PARAMS, use_tqdm=False)[0].outputs[0].token_ids
        llm.engine.check_health()
        ray.kill(llm.engine.runner.workers.actors[1])
        deadline = time.monotonic() + 10
        with pytest.raises(EngineFatalError, match=r"rank 1 .*killed by `ray\.kill`"):
            while time.monotonic() < deadline:  # health turns false as soon as Ray reports the death
                llm.engine.check_health()
                time.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(EngineFatalError, match="rank 1"):
            llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        assert time.monotonic() - started < 10  # failed, not hung in a collective
    finally:
        llm.close()
