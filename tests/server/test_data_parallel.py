"""Data-parallel replicas: prefix-aware routing, and a two-replica server that answers as one replica does."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from hawker import LLM, SamplingParams
from hawker.cli import build_parser
from hawker.engine.async_engine import AsyncEngine, EngineDeadError, RequestStream, Submission
from hawker.engine.engine import Engine
from hawker.engine.kv_cache import KVCacheManager, prefix_block_keys
from hawker.engine.request import Request
from hawker.options import EngineOptions
from hawker.server.app import ServerSettings, build_app
from hawker.server.router import (
    BALANCE,
    LEAST_LOADED,
    PREFIX_HIT,
    ReplicaRouter,
    RouteDecision,
    RouterObserver,
    RoutingPolicy,
    choose_replica,
)
from hawker.server.serve import ServeOptions, build_router, cpu_threads_per_replica, replica_engine_options
from tests.support.server_process import serve_in_process
from tests.support.tiny_models import VOCAB_SIZE

BLOCK_SIZE = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def _options(checkpoint: Path) -> EngineOptions:
    return EngineOptions(model=str(checkpoint), dtype="float32", block_size=BLOCK_SIZE, kv_cache_memory_gb=0.02)


def _ids(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(3, VOCAB_SIZE) for _ in range(length)]


# ------------------------------------------------------------ prefix keys
def test_cached_prefix_count_walks_the_cache_chain_read_only() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    tokens = list(range(10, 20))  # two full blocks and a partial one
    request = Request("r", tokens, GREEDY, max_tokens=4, arrival_index=0)
    assert kv.allocate(request, len(tokens))
    request.num_computed_tokens = len(tokens)
    kv.cache_full_blocks(request)

    keys = prefix_block_keys(tokens, BLOCK_SIZE)
    assert [hash(key) for key in keys] == request.block_hashes  # the cache's own chain
    assert kv.num_cached_leading_blocks(keys) == 2
    assert kv.num_cached_leading_blocks(prefix_block_keys([*tokens[:8], 99, 98, 97, 96], BLOCK_SIZE)) == 2
    assert kv.num_cached_leading_blocks(prefix_block_keys(tokens[:6], BLOCK_SIZE)) == 1
    assert kv.num_cached_leading_blocks(prefix_block_keys([99, *tokens[1:]], BLOCK_SIZE)) == 0
    # The second block alone is not a prefix: its key chains from the first.
    assert kv.num_cached_leading_blocks(prefix_block_keys(tokens[4:], BLOCK_SIZE)) == 0

    kv.free(request)  # the blocks stay cached, unreferenced, in LRU order
    before = (list(kv.free_queue), list(kv.ref_counts), kv.stats.queried_tokens, kv.stats.hit_tokens)
    assert kv.num_cached_leading_blocks(keys) == 2
    assert (list(kv.free_queue), list(kv.ref_counts), kv.stats.queried_tokens, kv.stats.hit_tokens) == before
    kv.check_invariants()


# -------------------------------------------------------------- the policy
def test_choose_replica_prefers_the_longest_prefix_within_the_load_bound() -> None:
    policy = RoutingPolicy(max_load_imbalance=2)
    never = [0, 0, 0]
    assert choose_replica([0, 0], [0, 0], never[:2], policy) == RouteDecision(0, LEAST_LOADED, 0)
    assert choose_replica([0, 0], [0, 0], [1, 0], policy) == RouteDecision(1, LEAST_LOADED, 0)  # alternate
    assert choose_replica([0, 0, 0], [2, 1, 1], [0, 2, 1], policy) == RouteDecision(2, LEAST_LOADED, 0)
    assert choose_replica([3, 5], [0, 2], never[:2], policy) == RouteDecision(1, PREFIX_HIT, 5)
    assert choose_replica([5, 5], [3, 1], never[:2], policy) == RouteDecision(1, PREFIX_HIT, 5)  # equal: by load
    assert choose_replica([1, 5], [0, 3], never[:2], policy) == RouteDecision(0, BALANCE, 1)  # too far ahead
    with pytest.raises(ValueError, match="max_load_imbalance"):
        RoutingPolicy(max_load_imbalance=-1)


def test_serve_options_and_flag() -> None:
    args = build_parser().parse_args(["serve", "--data-parallel-size", "2"])
    assert args.data_parallel_size == 2
    assert build_parser().parse_args(["serve"]).data_parallel_size == 1
    with pytest.raises(ValueError, match="data_parallel_size"):
        ServeOptions(engine=EngineOptions(), data_parallel_size=0)
    with pytest.raises(ValueError, match="tensor or pipeline"):
        ServeOptions(engine=EngineOptions(tensor_parallel_size=2), data_parallel_size=2)
    options = EngineOptions(device="cpu", seed=5)
    assert replica_engine_options(options, 0, 1) is options
    assert [replica_engine_options(options, i, 2).seed for i in range(2)] == [5, 6]
    assert replica_engine_options(options, 1, 2).device == "cpu"
    assert [cpu_threads_per_replica(2, 2), cpu_threads_per_replica(2, 3), cpu_threads_per_replica(16, 2)] == [1, 1, 8]


# -------------------------------------------------- the router on engines
class _Recorder(RouterObserver):
    def __init__(self) -> None:
        self.routes: list[tuple[int, str, int]] = []

    def on_route(self, decision: RouteDecision, num_requests: int) -> None:
        self.routes.append((decision.replica, decision.reason, num_requests))


@pytest.fixture(scope="module")
def engines(tiny_checkpoints: dict[str, Path]) -> list[Engine]:
    return [Engine.from_options(_options(tiny_checkpoints["llama"])) for _ in range(2)]


def test_router_keeps_shared_prefixes_together_and_spreads_the_rest(engines: list[Engine]) -> None:
    rng = random.Random(0)
    shared = _ids(rng, 40)  # ten full blocks
    distinct = [_ids(rng, 12) for _ in range(3)]
    router = ReplicaRouter([AsyncEngine(engine) for engine in engines], RoutingPolicy(max_load_imbalance=4))
    recorder = _Recorder()
    router.observer = recorder

    def submit(request_id: str, *prompts: list[int]) -> list[RequestStream]:
        ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        return router.submit_many([Submission(rid, ids_, GREEDY) for rid, ids_ in zip(ids, prompts, strict=True)])

    async def finish(streams: list[RequestStream]) -> None:
        await asyncio.gather(*(stream.final() for stream in streams))

    async def scenario() -> None:
        router.start()
        try:
            # A burst: nothing is cached yet. Distinct prompts go by load; the
            # second shared-prefix prompt follows the first, still in flight.
            burst = [
                *submit("d0", distinct[0]),
                *submit("s0", [*shared, 1, 2, 3]),
                *submit("s1", [*shared, 4, 5, 6]),
                *submit("d1", distinct[1]),
            ]
            placed = [router.replica_of(s.request_id) for s in burst]
            assert placed == [0, 1, 1, 0]
            await finish(burst)
            assert [router.replica_of(s.request_id) for s in burst] == [None] * 4  # released on close

            # Now from the prefix cache: each prompt goes where its prefix lives,
            # even when that replica is already the busier one.
            later = [
                *submit("s2", [*shared, 7, 8, 9]),
                *submit("s3", [*shared, 10, 11]),
                *submit("d0b", [*distinct[0][:8], 12, 13]),
            ]
            assert [router.replica_of(s.request_id) for s in later] == [1, 1, 0]
            await finish(later)
            # One HTTP request's prompts stay together. Loads are equal again:
            # replica 1 was routed to less recently than replica 0.
            group = submit("g", distinct[2], [*distinct[2][:8], 14])
            assert {router.replica_of(s.request_id) for s in group} == {1}
            await finish(group)
            assert await router.wait_idle(5.0)
        finally:
            router.stop()

    hits_before = engines[1].kv.stats.hit_tokens
    asyncio.run(scenario())
    assert recorder.routes == [
        (0, LEAST_LOADED, 1),
        (1, LEAST_LOADED, 1),
        (1, PREFIX_HIT, 1),
        (0, LEAST_LOADED, 1),
        (1, PREFIX_HIT, 1),
        (1, PREFIX_HIT, 1),
        (0, PREFIX_HIT, 1),
        (1, LEAST_LOADED, 2),
    ]
    # s2 and s3 reused the prefix (s1 was prefilled in the same step as s0, before it was cached).
    assert engines[1].kv.stats.hit_tokens - hits_before == 2 * len(shared)
    for engine in engines:
        engine.kv.check_invariants()
        assert engine.kv.usage == 0


def test_router_is_unhealthy_when_any_replica_is_dead(engines: list[Engine]) -> None:
    router = ReplicaRouter([AsyncEngine(engine) for engine in engines])

    async def scenario() -> None:
        router.start()
        assert router.is_healthy
        router.replicas[1].stop()
        assert not router.is_healthy
        assert router.replica_health() == [True, False]
        with pytest.raises(EngineDeadError, match="replica 1 of 2"):
            router.raise_if_dead()
        with pytest.raises(EngineDeadError):
            router.submit_many([Submission("x", [5, 6, 7], GREEDY)])
        router.stop()

    asyncio.run(scenario())


# ------------------------------------------------------ a two-replica server
@dataclass
class _InProcessServer:
    base_url: str
    router: ReplicaRouter

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        samples: dict[str, float] = {}
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples


@pytest.fixture(scope="module")
def dp_server(tiny_checkpoints: dict[str, Path]) -> Iterator[_InProcessServer]:
    """The server `hawker serve --data-parallel-size 2` runs, in this process so that tests can see its engines."""
    options = ServeOptions(engine=_options(tiny_checkpoints["llama"]), data_parallel_size=2)
    router = build_router(options)
    with serve_in_process(build_app(router, ServerSettings(served_model_name="tiny"))) as base_url:
        yield _InProcessServer(base_url, router)


@pytest.fixture(scope="module")
def single(tiny_checkpoints: dict[str, Path]) -> LLM:
    return LLM(str(tiny_checkpoints["llama"]), dtype="float32", block_size=BLOCK_SIZE, kv_cache_memory_gb=0.02)


def _wait_idle(server: _InProcessServer, within: float = 5.0) -> dict[str, float]:
    deadline = time.monotonic() + within
    while True:
        m = server.metrics()
        busy = [k for k, v in m.items() if v and k.startswith(("hawker:num_requests_", "hawker:kv_cache_usage_perc"))]
        if not busy:
            return m
        assert time.monotonic() < deadline, f"not idle after {within} s: {busy}"
        time.sleep(0.02)


def test_two_replica_server_routes_by_prefix_and_matches_one_replica(dp_server: _InProcessServer, single: LLM) -> None:
    client = openai.OpenAI(base_url=f"{dp_server.base_url}/v1", api_key="unused")
    rng = random.Random(1)
    shared = _ids(rng, 48)
    prompts = [[*shared, *_ids(rng, 3)] for _ in range(4)] + [_ids(rng, 20) for _ in range(4)]
    outputs = single.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    expected = [output.outputs[0].text for output in outputs]

    def complete(prompt: list[int]) -> str:
        response = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
        )
        return response.choices[0].text

    first = complete(prompts[0])  # caches the shared prefix on one replica
    with ThreadPoolExecutor(4) as pool:  # the rest arrive together
        rest = list(pool.map(complete, prompts[1:]))
    assert [first, *rest] == expected

    m = _wait_idle(dp_server)
    holder = max(range(2), key=lambda r: m[f"hawker:prefix_cache_hits_total{{replica={r}}}"])
    assert m[f"hawker:router_requests_total{{reason=prefix_hit,replica={holder}}}"] >= 3
    assert m[f"hawker:prefix_cache_hits_total{{replica={holder}}}"] >= 3 * len(shared)
    assert m[f"hawker:prefix_cache_hits_total{{replica={1 - holder}}}"] == 0
    routed = sum(v for k, v in m.items() if k.startswith("hawker:router_requests_total"))
    assert routed == len(prompts)
    assert all(m[f"hawker:num_requests_running{{replica={r}}}"] == 0 for r in range(2))
    assert m[f"hawker:router_requests_total{{reason=least_loaded,replica={1 - holder}}}"] >= 1  # both served
    assert "hawker:num_requests_running" not in m  # with replicas, every engine series is labelled
    for replica in dp_server.router.replicas:
        replica.engine.kv.check_invariants()


def test_two_replica_server_is_unhealthy_once_a_replica_dies(dp_server: _InProcessServer) -> None:
    assert httpx.get(f"{dp_server.base_url}/health", timeout=10).status_code == 200
    dp_server.router.replicas[1].stop()
    response = httpx.get(f"{dp_server.base_url}/health", timeout=10)
    assert response.status_code == 503
    assert "replica 1" in response.json()["error"]["message"]
    assert dp_server.metrics()["hawker:engine_healthy{replica=1}"] == 0
