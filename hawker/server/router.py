"""Data parallel: several engine replicas behind one server, routed by cached prefix.

Each replica is a whole ``AsyncEngine`` (its own model copy, KV pool, prefix
cache and step thread). The router sends each HTTP request to the replica
that already holds the longest prefix of its prompt, because a prefix cached
on one replica is worth nothing on another; when no replica holds any of it,
to the one with the fewest requests in flight.

"Holds" means either cached in the replica's prefix cache (asked read-only
through ``KVCacheManager.num_cached_leading_blocks``) or belonging to a
prompt the router sent there that is still in flight: a prompt's blocks only
enter the cache once its prefill ran, and a burst of requests with one long
system prompt must not be spread over the replicas before that happens.

All router state lives on the event loop (``submit_many`` and the observer
callbacks run there). The only cross-thread access is the read of each
replica's prefix-cache dict, whose single lookups are atomic; a stale answer
makes one routing choice worse, never wrong.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from hawker.engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    RequestObserver,
    RequestStream,
    StreamProgress,
    Submission,
)
from hawker.engine.engine import EngineStats
from hawker.engine.kv_cache import BlockKey, prefix_block_keys
from hawker.engine.request import Request, RequestStatus
from hawker.outputs import RequestOutput
from hawker.structured.params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# Why a request went where it went (the ``reason`` label of the routing counter).
PREFIX_HIT = "prefix_hit"  # the replica holding the longest prefix of the prompt
LEAST_LOADED = "least_loaded"  # no replica holds any full block of it
BALANCE = "balance"  # a replica held a prefix but was too far ahead in load
ROUTE_REASONS = (PREFIX_HIT, LEAST_LOADED, BALANCE)


# What the dashboard's in-flight table says a request is doing (``ReplicaRouter.request_state``).
QUEUED = "queued"  # accepted, not yet seen by the scheduler
WAITING = "waiting"  # in the scheduler's waiting queue
PREFILL = "prefill"  # running, its prompt (or a recompute) not fully computed
DECODE = "decode"  # running, one token per step
PREEMPTED = "preempted"  # evicted from the KV cache; waits to recompute


@dataclass(frozen=True)
class RoutingPolicy:
    """When a cached prefix outweighs an uneven load.

    A replica holding a prefix gets the request unless it has more than
    ``max_load_imbalance`` requests in flight beyond the least loaded one.
    Without that bound every chat request would pile onto one replica: they
    all share the chat template's first block or two.
    """

    max_load_imbalance: int = 8

    def __post_init__(self) -> None:
        if self.max_load_imbalance < 0:
            raise ValueError(f"max_load_imbalance must be >= 0, got {self.max_load_imbalance}")


@dataclass(frozen=True)
class RouteDecision:
    replica: int
    reason: str
    matched_blocks: int  # full leading prompt blocks the chosen replica holds


def choose_replica(
    matched_blocks: Sequence[int], loads: Sequence[int], last_routed: Sequence[int], policy: RoutingPolicy
) -> RouteDecision:
    """Pick a replica from how many leading blocks each holds and how many requests each has in flight.

    Ties go to the less loaded replica, then to the one routed to least
    recently (``last_routed``: higher = more recent), so that requests to an
    idle server alternate instead of all landing on replica 0.
    """
    replicas = range(len(loads))

    def order(i: int) -> tuple[int, int, int]:
        return loads[i], last_routed[i], i

    least = min(replicas, key=order)
    longest = max(matched_blocks)
    if longest == 0:
        return RouteDecision(least, LEAST_LOADED, 0)
    holder = min((i for i in replicas if matched_blocks[i] == longest), key=order)
    if loads[holder] - loads[least] > policy.max_load_imbalance:
        return RouteDecision(least, BALANCE, matched_blocks[least])
    return RouteDecision(holder, PREFIX_HIT, longest)


def scheduler_state(requests: Mapping[str, Request], request_id: str) -> str:
    """The state of request ``request_id`` in a scheduler's request map (``n > 1``: its first sample)."""
    request = requests.get(request_id) or requests.get(f"{request_id}#0")
    if request is None:
        return QUEUED
    if request.status is RequestStatus.WAITING:
        return PREEMPTED if request.num_preemptions else WAITING
    if request.status is RequestStatus.RUNNING:
        # A decoding request has exactly its newest token left to compute.
        return PREFILL if request.num_tokens - request.num_computed_tokens > 1 else DECODE
    return request.status.value  # finished this step; its last output is on its way


class RouterObserver(RequestObserver):
    """A RequestObserver that also hears every routing decision (the server's metrics)."""

    def on_route(self, decision: RouteDecision, num_requests: int) -> None:
        del decision, num_requests

    def on_submitted(self, replica: int, submissions: Sequence[Submission]) -> None:
        """The requests were queued on ``replica`` (their streams exist; no output has come yet)."""
        del replica, submissions


class ObserverGroup(RouterObserver):
    """Forwards every event to each of several observers, in order (metrics, then request tracking)."""

    def __init__(self, observers: Sequence[RouterObserver]) -> None:
        self.observers = tuple(observers)

    def on_route(self, decision: RouteDecision, num_requests: int) -> None:
        for observer in self.observers:
            observer.on_route(decision, num_requests)

    def on_submitted(self, replica: int, submissions: Sequence[Submission]) -> None:
        for observer in self.observers:
            observer.on_submitted(replica, submissions)

    def on_output(self, output: RequestOutput, now: float, previous: StreamProgress | None) -> None:
        for observer in self.observers:
            observer.on_output(output, now, previous)

    def on_step(self, seconds: float) -> None:
        for observer in self.observers:
            observer.on_step(seconds)

    def on_client_gone(self, request_id: str) -> None:
        for observer in self.observers:
            observer.on_client_gone(request_id)

    def on_stream_closed(self, request_id: str) -> None:
        for observer in self.observers:
            observer.on_stream_closed(request_id)


@dataclass(frozen=True)
class _Route:
    replica: int
    block_hashes: tuple[int, ...]


class ReplicaRouter:
    """N ``AsyncEngine`` replicas behind the interface the HTTP app uses.

    The requests of one ``submit_many`` call (one HTTP request with several
    prompts) all go to one replica: they share its fate, and their
    validation and queueing stay all-or-nothing.
    """

    def __init__(self, replicas: Sequence[AsyncEngine], policy: RoutingPolicy | None = None) -> None:
        if not replicas:
            raise ValueError("a router needs at least one replica")
        block_sizes = {replica.engine.kv.block_size for replica in replicas}
        if len(block_sizes) != 1:
            # Prompt keys are hashed once for all replicas: their blocks must be alike.
            raise ValueError(f"replicas must share one KV block size, got {sorted(block_sizes)}")
        self.replicas = list(replicas)
        self.policy = policy or RoutingPolicy()
        self.observer = RouterObserver()  # the server replaces it with its metrics
        self._block_size = block_sizes.pop()
        self._routes: dict[str, _Route] = {}
        self._loads = [0] * len(replicas)
        self._last_routed = [0] * len(replicas)
        self._num_routed = 0
        # Chain hashes of the full prompt blocks of each replica's in-flight requests.
        self._in_flight_blocks: list[Counter[int]] = [Counter() for _ in replicas]
        for index, replica in enumerate(self.replicas):
            replica.observer = _ReplicaObserver(self, index)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        for replica in self.replicas:
            replica.start()

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()

    @property
    def is_healthy(self) -> bool:
        return all(replica.is_healthy for replica in self.replicas)

    def check_constraint(self, constraint: StructuredOutputsParams) -> None:
        """Compile a request's output constraint on every replica (cached there); ``ValueError`` if it is bad."""
        for replica in self.replicas:
            replica.engine.grammars.check(constraint)

    def raise_if_dead(self) -> None:
        """Raise ``EngineDeadError`` if any replica's loop has stopped: the server is then unhealthy."""
        if len(self.replicas) == 1:
            self.replicas[0].raise_if_dead()
            return
        for index, replica in enumerate(self.replicas):
            try:
                replica.raise_if_dead()
            except EngineDeadError as error:
                raise EngineDeadError(f"data-parallel replica {index} of {len(self.replicas)}: {error}") from None

    # ----------------------------------------------------- model and stats
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.replicas[0].tokenizer

    @property
    def max_model_len(self) -> int:
        return self.replicas[0].engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.replicas[0].engine.config.model.vocab_size

    def replica_stats(self) -> list[EngineStats]:
        return [replica.stats() for replica in self.replicas]

    def replica_health(self) -> list[bool]:
        return [replica.is_healthy for replica in self.replicas]

    def replica_warming_up(self) -> list[bool]:
        return [replica.is_warming_up for replica in self.replicas]

    @property
    def is_warming_up(self) -> bool:
        """Some replica still builds its compiled decode step (it serves meanwhile, eagerly)."""
        return any(self.replica_warming_up())

    def request_state(self, replica: int, request_id: str) -> str:
        """What an in-flight request is doing (queued, waiting, prefill, decode, preempted), for the dashboard.

        Reads the replica's scheduler from the event loop while its engine
        thread steps: one dict lookup and a few attribute reads, each atomic,
        so the answer may be a step old but is never torn.
        """
        return scheduler_state(self.replicas[replica].engine.scheduler.requests, request_id)

    def replica_of(self, request_id: str) -> int | None:
        """The replica an in-flight request was sent to."""
        route = self._routes.get(request_id)
        return None if route is None else route.replica

    # -------------------------------------------------------------- requests
    def submit_many(self, submissions: Sequence[Submission]) -> list[RequestStream]:
        """Route the requests to one replica and queue them there (see ``AsyncEngine.submit_many``)."""
        self.raise_if_dead()
        for item in submissions:
            if item.request_id in self._routes:
                raise ValueError(f"request id {item.request_id!r} is already in use")
        keys = [prefix_block_keys(item.prompt_token_ids, self._block_size) for item in submissions]
        hashes = [tuple(hash(key) for key in prompt_keys) for prompt_keys in keys]
        decision = self.route(keys, hashes)
        streams = self.replicas[decision.replica].submit_many(submissions)
        for item, prompt_hashes in zip(submissions, hashes, strict=True):
            self._routes[item.request_id] = _Route(decision.replica, prompt_hashes)
            self._in_flight_blocks[decision.replica].update(prompt_hashes)
        self._loads[decision.replica] += len(submissions)
        self._num_routed += 1
        self._last_routed[decision.replica] = self._num_routed
        self.observer.on_route(decision, len(submissions))
        self.observer.on_submitted(decision.replica, submissions)
        logger.debug("routed %s to replica %d (%s)", submissions[0].request_id, decision.replica, decision.reason)
        return streams

    def route(self, keys: Sequence[Sequence[BlockKey]], hashes: Sequence[Sequence[int]]) -> RouteDecision:
        """Where prompts with these block keys (and their chain hashes) would go now."""
        matched = [
            sum(self._held_blocks(index, k, h) for k, h in zip(keys, hashes, strict=True))
            for index in range(len(self.replicas))
        ]
        return choose_replica(matched, self._loads, self._last_routed, self.policy)

    def _held_blocks(self, index: int, keys: Sequence[BlockKey], hashes: Sequence[int]) -> int:
        cached = self.replicas[index].engine.kv.num_cached_leading_blocks(keys)
        in_flight = self._in_flight_blocks[index]
        pending = 0
        for block_hash in hashes:
            if block_hash not in in_flight:
                break
            pending += 1
        return max(cached, pending)

    def _stream_closed(self, index: int, request_id: str) -> None:
        route = self._routes.pop(request_id, None)
        if route is None or route.replica != index:
            return
        self._loads[index] -= 1
        in_flight = self._in_flight_blocks[index]
        in_flight.subtract(route.block_hashes)
        for block_hash in route.block_hashes:
            if in_flight[block_hash] <= 0:
                del in_flight[block_hash]

    def abort_all(self) -> list[str]:
        return [request_id for replica in self.replicas for request_id in replica.abort_all()]

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no replica has a request in flight; False if the timeout came first."""
        idle = await asyncio.gather(*(replica.wait_idle(timeout) for replica in self.replicas))
        return all(idle)


class _ReplicaObserver(RequestObserver):
    """One replica's observer: forwards to the router's observer and keeps the router's books."""

    def __init__(self, router: ReplicaRouter, index: int) -> None:
        self.router = router
        self.index = index

    def on_output(self, output: RequestOutput, now: float, previous: StreamProgress | None) -> None:
        self.router.observer.on_output(output, now, previous)

    def on_step(self, seconds: float) -> None:
        self.router.observer.on_step(seconds)

    def on_client_gone(self, request_id: str) -> None:
        self.router.observer.on_client_gone(request_id)

    def on_stream_closed(self, request_id: str) -> None:
        self.router._stream_closed(self.index, request_id)
        self.router.observer.on_stream_closed(request_id)
