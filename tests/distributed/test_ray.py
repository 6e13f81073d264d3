"""Tensor parallelism through the Ray executor on a local two-node cluster (ray.cluster_utils.Cluster).

Each simulated node has one CPU and every rank reserves one, so the two
ranks of TP=2 land on different nodes; steps and collectives still go over
torch.distributed (gloo).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from hawker import LLM, RequestOutput, SamplingParams
from hawker.distributed.launch import free_port
from hawker.distributed.ray_executor import check_reachable
from hawker.engine.errors import EngineFatalError
from hawker.ray import PackedWeights, RolloutEngine
from tests.support.processes import descendants, live_command
from tests.support.server_process import launch, wait_ready
from tests.support.tiny_models import checkpoint_state

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


OPTIONS = {"dtype": "float32", "block_size": 4, "compile_decode_max_rows": 0}


def _engine(checkpoint: Path, **options: Any) -> LLM:
    return LLM(str(checkpoint), **OPTIONS, **options)


def _tokens_and_logprobs(llm: LLM) -> tuple[list[list[int]], list[list[float]]]:
    return _sampled(llm.generate(PROMPTS, PARAMS, use_tqdm=False))


def _sampled(outputs: list[RequestOutput]) -> tuple[list[list[int]], list[list[float]]]:
    """Each output's tokens and the logprob of each."""
    tokens = [list(out.outputs[0].token_ids) for out in outputs]
    logprobs = []
    for out in outputs:
        entries = out.outputs[0].logprobs
        assert entries is not None
        logprobs.append([entry[token].logprob for token, entry in zip(out.outputs[0].token_ids, entries, strict=True)])
    return tokens, logprobs


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2)])
def test_ranks_over_ray_actors_match_one_process(
    tiny_checkpoints: dict[str, Path], two_node_cluster: Cluster, tp: int, pp: int
) -> None:
    with _engine(tiny_checkpoints["llama"]) as single:
        want_tokens, want_logprobs = _tokens_and_logprobs(single)
    parallel = {"tensor_parallel_size": tp, "pipeline_parallel_size": pp}
    with _engine(tiny_checkpoints["llama"], distributed_executor_backend="ray", **parallel) as llm:
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


def test_a_rollout_engine_placed_by_a_trainer_spreads_its_ranks_over_the_trainers_bundles(
    tiny_checkpoints: dict[str, Path], trained_llama: Path, two_node_cluster: Cluster
) -> None:
    """As RL frameworks place engines: their placement group, the engine's actor in bundle 0, and the
    engine's other ranks in the same group's next bundles (nothing reserved twice); then new weights
    through the object store reach both ranks."""
    with _engine(tiny_checkpoints["llama"]) as single:
        want_tokens, want_logprobs = _tokens_and_logprobs(single)
    with _engine(trained_llama) as single:
        want_trained, _ = _tokens_and_logprobs(single)
    assert want_trained != want_tokens
    group = ray.util.placement_group([{"CPU": 1}, {"CPU": 1}], strategy="SPREAD")
    ray.get(group.ready(), timeout=60)
    try:
        in_bundle_0 = PlacementGroupSchedulingStrategy(group, 0, placement_group_capture_child_tasks=True)
        engine = (
            ray.remote(RolloutEngine)
            .options(num_cpus=1, scheduling_strategy=in_bundle_0)
            .remote(
                str(tiny_checkpoints["llama"]), tensor_parallel_size=2, distributed_executor_backend="ray", **OPTIONS
            )
        )
        tokens, logprobs = _sampled(ray.get(engine.generate.remote(PROMPTS, PARAMS), timeout=120))
        assert tokens == want_tokens
        for got, want in zip(logprobs, want_logprobs, strict=True):
            assert got == pytest.approx(want, abs=1e-4)
        packed = ray.put(PackedWeights.of(checkpoint_state(trained_llama).items()))
        assert ray.get(engine.update_weights.remote(packed), timeout=60) == 1
        outputs = ray.get(engine.generate.remote(PROMPTS, PARAMS), timeout=120)
        assert [list(out.outputs[0].token_ids) for out in outputs] == want_trained
        ray.get(engine.close.remote(), timeout=60)
        ray.kill(engine)
    finally:
        ray.util.remove_placement_group(group)


def test_a_served_engine_over_ray_fails_cleanly_when_a_rank_dies(
    tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    # The server starts a Ray of its own ("local"), from its main thread: a local Ray started from
    # the short-lived build thread lost its raylet as soon as the engine was built (PR_SET_PDEATHSIG).
    options = ("--tensor-parallel-size", "2", "--distributed-executor-backend", "ray", "--ray-address", "local")
    server = launch(tiny_checkpoints["llama"], tmp_path / "ray.log", *options)
    try:
        wait_ready(server, timeout=180)
        ray_processes = {pid: live_command(pid) or "" for pid in descendants(server.process.pid)}
        assert any("raylet" in command for command in ray_processes.values()), ray_processes
        (rank_actor,) = [pid for pid, command in ray_processes.items() if "RayRankActor" in command]
        os.kill(rank_actor, signal.SIGKILL)  # a crash, not a polite ray.kill
        started = time.monotonic()
        saw_unhealthy = False
        while server.process.poll() is None and time.monotonic() - started < 20:
            with contextlib.suppress(httpx.TransportError):
                saw_unhealthy |= httpx.get(f"{server.base_url}/health", timeout=2).status_code == 503
            time.sleep(0.2)
        assert server.process.poll() not in (None, 0), server.log()
        assert saw_unhealthy, "/health never reported the dead rank"
        assert "a worker rank died: rank 1 (Ray actor on" in server.log()
        deadline = time.monotonic() + 10  # and the Ray it started went with it
        while any(live_command(pid) for pid in ray_processes) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not {pid: c for pid in ray_processes if (c := live_command(pid))}
    finally:
        server.stop()


def test_a_cluster_too_small_or_unreachable_is_refused_with_a_reason(
    tiny_checkpoints: dict[str, Path], two_node_cluster: Cluster
) -> None:
    with pytest.raises(ValueError, match="ranks need"):  # 4 ranks of one CPU each on a 2-CPU cluster
        _engine(tiny_checkpoints["llama"], tensor_parallel_size=4, distributed_executor_backend="ray")
    assert ray.available_resources().get("CPU", 0) == 2  # nothing left reserved
    with pytest.raises(ValueError, match="no Ray cluster answers"):  # at once, not after Ray's retries
        check_reachable(f"127.0.0.1:{free_port()}")
