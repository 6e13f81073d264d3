"""Property tests of the paged KV cache manager and the scheduler, without a model.

``Sim`` drives a ``Scheduler`` the way ``Engine`` does (schedule -> commit,
which leaves each sampled token pending -> update with the read-back tokens,
which finishes at max_tokens -> a random stop) and keeps a shadow of what
every KV slot holds. A slot written while computing position p of a sequence
records the whole prefix ``token_ids[: p + 1]``, because that is what the key
and value at p depend on. Attention over a block table is correct only if every
slot it reads records exactly the reader's own prefix, so the shadow catches a
wrong prefix-cache hit, a block shared too early, a block evicted or reused
while still referenced, or a write into a block somebody else relies on.

With ``overlap`` the tokens of a step are read back only after the next step
was scheduled and committed (overlap scheduling): that step computes pending
tokens, whose true values the shadow knows (the device has them), and a
request stopping on a read-back token leaves the newer step's work for it
unused.

After every action the pool's books and the shadow are checked; at the end the
machine either keeps stepping until everything finished (a deadlock shows up
as a step bound being exceeded) or aborts everything, and the pool must be
whole again.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hawker.config import SchedulerConfig
from hawker.engine.kv_cache import KVCacheManager
from hawker.engine.request import PENDING_TOKEN, Request, RequestStatus
from hawker.engine.scheduler import CommittedStep, Scheduler
from hawker.sampling_params import SamplingParams
from hawker.step import ModelOutput, SchedulerOutput, SeqResult

# A tiny vocabulary makes equal blocks (and so prefix-cache hits) common.
VOCAB = 8

Prefix = tuple[int, ...]


@dataclass(frozen=True)
class SimConfig:
    num_blocks: int
    block_size: int
    enable_prefix_caching: bool
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int


def make_request(
    request_id: str,
    prompt: list[int],
    max_tokens: int,
    arrival_index: int,
    prefix_donor_id: str | None = None,
    sample_index: int = 0,
    n: int = 1,
) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=list(prompt),
        sampling_params=SamplingParams(max_tokens=max_tokens, n=n),
        max_tokens=max_tokens,
        arrival_index=arrival_index,
        parent_id=request_id.split("#")[0],
        sample_index=sample_index,
        prefix_donor_id=prefix_donor_id,
    )


class Sim:
    """The engine loop without a model, plus a shadow of the KV storage."""

    def __init__(self, config: SimConfig, overlap: bool = False, stop_chance: float = 0.0) -> None:
        self.config = config
        self.overlap = overlap
        self.stop_chance = stop_chance  # of a read-back token being a stop token
        # Sampled values not read back yet, per request, oldest first (the device's view).
        self.future: dict[str, list[int]] = {}
        self.in_flight: CommittedStep | None = None  # the step launched but not read back
        self.bs = config.block_size
        self.kv = KVCacheManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.sched = Scheduler(
            SchedulerConfig(
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_num_seqs=config.max_num_seqs,
                max_model_len=config.max_model_len,
            ),
            self.kv,
        )
        self.shadow: list[list[Prefix | None]] = [[None] * self.bs for _ in range(config.num_blocks)]
        self._group_ids = itertools.count()
        self._arrivals = itertools.count()
        self.groups: dict[str, list[str]] = {}
        self.prompts: list[list[int]] = []
        self.all_requests: dict[str, Request] = {}
        self.num_steps = 0
        self.num_preempted = 0
        self.num_shared_blocks_seen = 0

    # ------------------------------------------------------------ requests
    @property
    def capacity(self) -> int:
        """Longest prompt + max_tokens that Engine._validate lets through."""
        return min(self.config.max_model_len, self.config.num_blocks * self.bs)

    def fit(self, prompt: list[int], max_tokens: int) -> tuple[list[int], int]:
        prompt = (prompt or [0])[: self.capacity - 1]
        return prompt, max(1, min(max_tokens, self.capacity - len(prompt)))

    def add(self, prompt: list[int], max_tokens: int, n: int = 1) -> list[Request]:
        prompt, max_tokens = self.fit(prompt, max_tokens)
        # The same checks as Engine._validate: the request fits at all.
        assert 1 <= len(prompt) < self.config.max_model_len
        assert len(prompt) + max_tokens <= self.config.max_model_len
        assert self.kv.blocks_needed(len(prompt) + max_tokens) <= self.kv.num_blocks
        group = f"g{next(self._group_ids)}"
        seqs: list[Request] = []
        for index in range(n):
            seqs.append(
                make_request(
                    group if n == 1 else f"{group}#{index}",
                    prompt,
                    max_tokens,
                    next(self._arrivals),
                    prefix_donor_id=seqs[0].request_id if index else None,
                    sample_index=index,
                    n=n,
                )
            )
        for seq in seqs:
            self.sched.add(seq)
            self.all_requests[seq.request_id] = seq
        self.groups[group] = [s.request_id for s in seqs]
        self.prompts.append(prompt)
        return seqs

    def live_ids(self) -> list[str]:
        return sorted(self.sched.requests)

    def finish(self, request_id: str, status: RequestStatus) -> None:
        request = self.sched.requests[request_id]
        was_waiting = request.status == RequestStatus.WAITING
        held = list(self.kv.blocks_of(request_id))
        assert not (was_waiting and held), "a waiting request holds blocks"
        free_before = self.kv.num_free_blocks
        done = self.sched.finish(request_id, status)
        assert done is request and done.status == status
        assert request.num_pending_tokens == 0 and PENDING_TOKEN not in request.token_ids
        self.future.pop(request_id, None)  # its tokens in flight are never read back
        assert request_id not in self.kv.block_tables
        assert request not in self.sched.running and request not in self.sched.waiting
        # Blocks nobody else references went back to the pool.
        released = sum(1 for b in set(held) if self.kv.ref_counts[b] == 0)
        assert self.kv.num_free_blocks == free_before + released
        self._assert_finish_is_idempotent(request_id)

    def _assert_finish_is_idempotent(self, request_id: str) -> None:
        snapshot = self._snapshot()
        assert self.sched.finish(request_id, RequestStatus.FINISHED_ABORTED) is None
        assert self._snapshot() == snapshot

    def abort_group(self, group: str) -> None:
        """What Engine.abort does: every sibling of the user request goes."""
        for request_id in self.groups[group]:
            if request_id in self.sched.requests:
                self.finish(request_id, RequestStatus.FINISHED_ABORTED)
            else:
                self._assert_finish_is_idempotent(request_id)

    def _snapshot(self) -> tuple:
        return (
            list(self.kv.ref_counts),
            list(self.kv.free_queue),
            {k: list(v) for k, v in self.kv.block_tables.items()},
            dict(self.kv.cached),
            [r.request_id for r in self.sched.running],
            [r.request_id for r in self.sched.waiting],
        )

    # ---------------------------------------------------------------- step
    def step(self, rng: random.Random) -> SchedulerOutput:
        sched, kv, bs = self.sched, self.kv, self.bs
        before = {rid: (r.status, r.num_computed_tokens) for rid, r in sched.requests.items()}
        had_work = sched.has_unfinished
        out = sched.schedule()
        self.num_steps += 1
        self.num_preempted += len(out.preempted_ids)

        assert out.num_tokens <= self.config.max_num_batched_tokens, "token budget exceeded"
        assert len(sched.running) <= self.config.max_num_seqs, "max_num_seqs exceeded"
        if had_work and out.empty:
            # Only allowed when every running request stops on its pending token.
            sampled = [] if self.in_flight is None else self.in_flight.sampled
            assert any(sched.requests.get(r.request_id) is r for r in sampled), "the step scheduled nothing"
            assert all(r.num_pending_tokens for r in sched.running)
            self.resolve(self.in_flight, rng)
            self.in_flight = None
            return out
        ids = [s.request_id for s in out.seqs]
        assert len(ids) == len(set(ids)), "a request was scheduled twice in one step"
        for seq in out.seqs:
            request = sched.requests[seq.request_id]
            assert request.status == RequestStatus.RUNNING and request in sched.running
            assert seq.num_tokens >= 1
            end = seq.start_pos + seq.num_tokens
            assert seq.start_pos == request.num_computed_tokens
            status, computed = before[seq.request_id]
            if status == RequestStatus.RUNNING:
                assert seq.start_pos == computed, "a running request lost or skipped computed tokens"
            assert end <= request.num_tokens
            assert seq.token_ids == tuple(request.token_ids[seq.start_pos : end])
            assert seq.sample == (end == request.num_tokens)
            assert seq.num_prompt_tokens == request.num_prompt_tokens
            # The block table handed to the model runner is the live one and covers the chunk.
            assert seq.block_table == tuple(kv.blocks_of(seq.request_id))
            assert len(seq.block_table) * bs >= end
        for request_id in out.preempted_ids:
            request = sched.requests[request_id]
            assert request_id not in ids, "a preempted request was also scheduled"
            assert request.status == RequestStatus.WAITING and request in sched.waiting
            assert request.num_computed_tokens == 0
            assert request_id not in kv.block_tables

        # The model writes K/V of each chunk, then attends over everything up to its end.
        for seq in out.seqs:
            request = sched.requests[seq.request_id]
            for p in range(seq.start_pos, seq.start_pos + seq.num_tokens):
                block = seq.block_table[p // bs]
                assert kv.ref_counts[block] == 1, f"block {block} is written while shared"
                assert kv.block_keys[block] is None, f"block {block} is written while in the prefix cache"
                self.shadow[block][p % bs] = tuple(self.true_tokens(request)[: p + 1])
        for seq in out.seqs:
            request = sched.requests[seq.request_id]
            self.assert_kv_valid(request, seq.start_pos + seq.num_tokens, seq.block_table)

        committed = sched.commit(out)
        assert [r.request_id for r in committed.sampled] == [s.request_id for s in out.seqs if s.sample]
        for request in committed.sampled:
            assert request.token_ids[-1] == PENDING_TOKEN
            # Not sampled past its limits (a pending token may already reach them).
            assert request.num_output_tokens <= request.max_tokens
            assert request.num_tokens <= self.config.max_model_len
            self.future.setdefault(request.request_id, []).append(rng.randrange(VOCAB))
        previous, self.in_flight = self.in_flight, committed
        if self.overlap:
            self.resolve(previous, rng)
        else:
            assert previous is None
            self.resolve(committed, rng)
            self.in_flight = None
        return out

    def resolve(self, committed: CommittedStep | None, rng: random.Random) -> None:
        """Read back a step's tokens through ``Scheduler.update``, as Engine does; a request may stop on one."""
        if committed is None:
            return
        live = [r for r in committed.sampled if self.sched.requests.get(r.request_id) is r]
        # A request that finished while the step ran has its token ignored.
        results = {r.request_id: SeqResult(self.future[r.request_id].pop(0), None, None) for r in live}
        advanced = self.sched.update(committed, ModelOutput(results))
        assert [r for r, _ in advanced] == live
        for request, token in advanced:
            assert request.token_ids[request.num_known_tokens - 1] == token
            if request.finished:  # at max_tokens or max_model_len
                assert request.status == RequestStatus.FINISHED_LENGTH
                assert request.num_pending_tokens == 0 and request.request_id not in self.kv.block_tables
                self.future.pop(request.request_id, None)  # its tokens in flight are never read back
            elif rng.random() < self.stop_chance:
                self.finish(request.request_id, RequestStatus.FINISHED_STOPPED)

    def true_tokens(self, request: Request) -> list[int]:
        """The request's tokens with pending ones replaced by their sampled values."""
        return request.token_ids[: request.num_known_tokens] + self.future.get(request.request_id, [])

    # ------------------------------------------------------------- checks
    def assert_kv_valid(self, request: Request, upto: int, table: tuple[int, ...] | list[int]) -> None:
        """Every slot attention reads for positions < upto holds this request's own prefix."""
        for p in range(upto):
            got = self.shadow[table[p // self.bs]][p % self.bs]
            if got != tuple(self.true_tokens(request)[: p + 1]):
                raise AssertionError(
                    f"{request.request_id} position {p} (block {table[p // self.bs]}) holds K/V of "
                    f"{got}, expected {tuple(self.true_tokens(request)[: p + 1])}"
                )

    def check(self) -> None:
        sched, kv, bs = self.sched, self.kv, self.bs
        kv.check_invariants()
        tables = kv.block_tables
        running_ids = [r.request_id for r in sched.running]
        waiting_ids = [r.request_id for r in sched.waiting]
        assert len(set(running_ids) | set(waiting_ids)) == len(running_ids) + len(waiting_ids)
        assert set(running_ids) | set(waiting_ids) == set(sched.requests)
        assert set(tables) == set(running_ids), "only running requests hold block tables"
        assert len(running_ids) <= self.config.max_num_seqs

        assert sum(kv.ref_counts) == sum(len(t) for t in tables.values())
        assert kv.num_free_blocks == sum(1 for c in kv.ref_counts if c == 0)
        assert all(c >= 0 for c in kv.ref_counts)

        holders: dict[int, list[tuple[str, int]]] = {}
        for request_id, table in tables.items():
            assert len(set(table)) == len(table), f"{request_id} holds a block twice"
            for index, block in enumerate(table):
                holders.setdefault(block, []).append((request_id, index))
        for block, owners in holders.items():
            assert kv.ref_counts[block] == len(owners)
            if len(owners) == 1:
                continue
            # Shared: a full, computed, never-again-written prefix block at the same position for all.
            self.num_shared_blocks_seen += 1
            positions = {index for _, index in owners}
            assert len(positions) == 1, f"block {block} is shared at different positions {owners}"
            (index,) = positions
            contents = set()
            for request_id, _ in owners:
                request = sched.requests[request_id]
                assert (index + 1) * bs <= request.num_computed_tokens, (
                    f"block {block} is shared by {owners} but {request_id} has not computed it"
                )
                contents.add(tuple(self.true_tokens(request)[: (index + 1) * bs]))
            assert len(contents) == 1, f"block {block} is shared by requests with different prefixes"

        for request in sched.requests.values():
            # Never computed (or sampled) past its limits, pending tokens included.
            assert request.num_output_tokens <= request.max_tokens
            assert request.num_tokens <= self.config.max_model_len
        for request in sched.running:
            table = tables[request.request_id]
            assert request.num_computed_tokens <= request.num_tokens
            assert len(table) * bs >= request.num_computed_tokens, "table does not cover computed tokens"
            self.assert_kv_valid(request, request.num_computed_tokens, table)
        for request in sched.waiting:
            assert request.status == RequestStatus.WAITING
            assert request.num_computed_tokens == 0

        # A block in the prefix cache holds exactly the tokens of its key.
        for (_, tokens), block in kv.cached.items():
            slots = self.shadow[block]
            assert all(s is not None for s in slots)
            assert tuple(s[-1] for s in slots) == tokens  # type: ignore[index]
        assert kv.stats.hit_tokens <= kv.stats.queried_tokens
        if not self.config.enable_prefix_caching:
            assert not kv.cached and kv.stats.hit_tokens == 0

    def step_bound(self) -> int:
        """Generous: the oldest running request gets >= 1 token every step."""
        return 2 * sum(r.num_prompt_tokens + r.max_tokens for r in self.sched.requests.values()) + 10

    def drain(self, rng: random.Random) -> None:
        bound = self.step_bound()
        for _ in range(bound):
            if not self.sched.has_unfinished:
                break
            self.step(rng)
            self.check()
        assert not self.sched.has_unfinished, (
            f"no progress after {bound} steps: running={[r.request_id for r in self.sched.running]} "
            f"waiting={[r.request_id for r in self.sched.waiting]}"
        )
        for request in self.all_requests.values():
            assert request.finished
            if request.status == RequestStatus.FINISHED_LENGTH:
                assert request.num_output_tokens == request.max_tokens

    def abort_all(self) -> None:
        for group in list(self.groups):
            self.abort_group(group)
            self.check()

    def assert_pool_whole(self) -> None:
        self.check()
        assert self.kv.num_free_blocks == self.kv.num_blocks
        assert not self.kv.block_tables
        assert all(c == 0 for c in self.kv.ref_counts)
        assert not self.sched.running and not self.sched.waiting and not self.sched.requests


# ---------------------------------------------------------------- strategies
@st.composite
def sim_configs(draw: st.DrawFn) -> SimConfig:
    return SimConfig(
        num_blocks=draw(st.integers(4, 40)),
        block_size=draw(st.sampled_from([1, 2, 4])),
        enable_prefix_caching=draw(st.booleans()),
        max_num_batched_tokens=draw(st.integers(1, 48)),
        max_num_seqs=draw(st.integers(1, 6)),
        max_model_len=draw(st.integers(4, 64)),
    )


token_lists = st.lists(st.integers(0, VOCAB - 1), min_size=0, max_size=20)
shared_prefix = st.none() | st.tuples(st.integers(0, 1000), st.integers(0, 32))


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sim: Sim | None = None
        self.drain_at_end = True

    @initialize(config=sim_configs(), drain_at_end=st.booleans(), overlap=st.booleans())
    def setup(self, config: SimConfig, drain_at_end: bool, overlap: bool) -> None:
        self.sim = Sim(config, overlap, stop_chance=0.05)
        self.drain_at_end = drain_at_end

    def _prompt(self, suffix: list[int], share: tuple[int, int] | None) -> list[int]:
        assert self.sim is not None
        if share is None or not self.sim.prompts:
            return suffix
        base = self.sim.prompts[share[0] % len(self.sim.prompts)]
        return base[: share[1]] + suffix

    @rule(suffix=token_lists, share=shared_prefix, max_tokens=st.integers(1, 32))
    def add_request(self, suffix: list[int], share: tuple[int, int] | None, max_tokens: int) -> None:
        assert self.sim is not None
        self.sim.add(self._prompt(suffix, share), max_tokens)

    @rule(suffix=token_lists, share=shared_prefix, max_tokens=st.integers(1, 12), n=st.integers(2, 4))
    def add_siblings(self, suffix: list[int], share: tuple[int, int] | None, max_tokens: int, n: int) -> None:
        assert self.sim is not None
        self.sim.add(self._prompt(suffix, share), max_tokens, n=n)

    @rule(seed=st.integers(0, 2**16), count=st.integers(1, 8))
    def step(self, seed: int, count: int) -> None:
        assert self.sim is not None
        rng = random.Random(seed)
        for _ in range(count):
            self.sim.step(rng)
            self.sim.check()

    @precondition(lambda self: self.sim is not None and self.sim.sched.requests)
    @rule(kind=st.sampled_from(["stop", "abort_running", "abort_waiting", "abort_group"]), pick=st.integers(0, 1000))
    def remove(self, kind: str, pick: int) -> None:
        """A sequence stops early (EOS, stop string) or is aborted, whatever its state."""
        assert self.sim is not None
        sched = self.sim.sched
        if kind == "abort_group":
            groups = sorted({r.parent_id or r.request_id for r in sched.requests.values()})
            self.sim.abort_group(groups[pick % len(groups)])
            return
        pool = {"abort_running": sched.running, "abort_waiting": list(sched.waiting)}.get(kind, [])
        ids = [r.request_id for r in pool] or self.sim.live_ids()
        status = RequestStatus.FINISHED_STOPPED if kind == "stop" else RequestStatus.FINISHED_ABORTED
        self.sim.finish(ids[pick % len(ids)], status)

    @invariant()
    def books_balance(self) -> None:
        if self.sim is not None:
            self.sim.check()

    def teardown(self) -> None:
        if self.sim is None:
            return
        if self.drain_at_end:
            self.sim.drain(random.Random(0))
        else:
            self.sim.abort_all()
        self.sim.assert_pool_whole()


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# ------------------------------------------------------- batch-shaped property
@settings(max_examples=60, deadline=None)
@given(
    config=sim_configs(),
    requests=st.lists(st.tuples(token_lists, st.integers(1, 24), st.integers(1, 3)), min_size=1, max_size=12),
    seed=st.integers(0, 2**16),
    overlap=st.booleans(),
)
def test_every_request_finishes(
    config: SimConfig, requests: list[tuple[list[int], int, int]], seed: int, overlap: bool
) -> None:
    """Like LLM.generate: a batch arrives at once and stepping alone must finish all of it."""
    sim = Sim(config, overlap, stop_chance=0.05)
    for prompt, max_tokens, n in requests:
        sim.add(prompt, max_tokens, n=n)
    sim.check()
    sim.drain(random.Random(seed))
    sim.assert_pool_whole()


@settings(max_examples=100, deadline=None)
@given(
    num_blocks=st.integers(2, 16),
    block_size=st.sampled_from([1, 2, 4]),
    sizes=st.lists(st.integers(1, 20), min_size=1, max_size=8),
    extra=st.integers(1, 64),
)
def test_failed_allocation_changes_nothing(num_blocks: int, block_size: int, sizes: list[int], extra: int) -> None:
    kv = KVCacheManager(num_blocks, block_size)
    for i, size in enumerate(sizes):
        request = make_request(f"r{i}", [i % VOCAB] * size, 1, i)
        before = (list(kv.ref_counts), list(kv.free_queue), {k: list(v) for k, v in kv.block_tables.items()})
        ok = kv.allocate(request, size)
        if ok:
            assert len(kv.blocks_of(request.request_id)) == kv.blocks_needed(size)
        else:
            assert kv.blocks_needed(size) > before[0].count(0)
            after = (list(kv.ref_counts), list(kv.free_queue), {k: list(v) for k, v in kv.block_tables.items()})
            assert after == before
        kv.check_invariants()
    # Growing past the pool fails atomically too.
    if "r0" in kv.block_tables:
        before_table = list(kv.blocks_of("r0"))
        before_free = kv.num_free_blocks
        assert not kv.allocate(make_request("r0", [0] * sizes[0], 1, 0), kv.num_blocks * block_size + extra)
        assert kv.blocks_of("r0") == before_table and kv.num_free_blocks == before_free
    kv.check_invariants()


# ------------------------------------------------------------ deterministic
def _sim(num_blocks: int = 16, block_size: int = 4, prefix: bool = True, budget: int = 64, seqs: int = 8) -> Sim:
    return Sim(SimConfig(num_blocks, block_size, prefix, budget, seqs, 64))


def _run_until(sim: Sim, done: Callable[[], bool], limit: int = 100) -> None:
    rng = random.Random(0)
    for _ in range(limit):
        if done():
            return
        sim.step(rng)
        sim.check()
    raise AssertionError("condition not reached")


@pytest.mark.parametrize(("prompt_len", "expected_hit"), [(12, 8), (13, 12), (11, 8), (4, 0), (5, 4)])
def test_prefix_cache_hit_leaves_one_token(prompt_len: int, expected_hit: int) -> None:
    sim = _sim()
    prompt = [(3 * i + 1) % VOCAB for i in range(prompt_len)]
    (first,) = sim.add(prompt, 4)
    _run_until(sim, lambda: first.num_computed_tokens >= prompt_len)
    assert first.num_cached_tokens == 0
    hits_before = sim.kv.stats.hit_tokens
    queried_before = sim.kv.stats.queried_tokens

    (second,) = sim.add(prompt, 4)
    out = sim.step(random.Random(0))
    sim.check()
    seq = next(s for s in out.seqs if s.request_id == second.request_id)
    assert second.num_cached_tokens == expected_hit
    assert seq.start_pos == expected_hit and seq.num_tokens == prompt_len - expected_hit
    assert sim.kv.stats.hit_tokens == hits_before + expected_hit
    assert sim.kv.stats.queried_tokens == queried_before + prompt_len
    shared = expected_hit // sim.bs
    assert sim.kv.blocks_of(second.request_id)[:shared] == sim.kv.blocks_of(first.request_id)[:shared]
    for block in sim.kv.blocks_of(second.request_id)[:shared]:
        assert sim.kv.ref_counts[block] == 2
    sim.drain(random.Random(1))
    sim.assert_pool_whole()


def test_no_prefix_hits_when_disabled() -> None:
    sim = _sim(prefix=False)
    prompt = [1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4]
    sim.add(prompt, 2)
    sim.drain(random.Random(0))
    (second,) = sim.add(prompt, 2)
    sim.drain(random.Random(0))
    assert second.num_cached_tokens == 0
    assert sim.kv.stats.hit_tokens == 0 and not sim.kv.cached
    sim.assert_pool_whole()


def test_freed_blocks_are_reused_then_evicted_least_recently_used_first() -> None:
    # 6 blocks of 4 tokens; each 9-token prompt holds 2 full (cacheable) blocks + 1 partial.
    sim = _sim(num_blocks=6, block_size=4)
    p1 = [1, 1, 1, 1, 2, 2, 2, 2, 3]
    p2 = [4, 4, 4, 4, 5, 5, 5, 5, 6]
    p3 = [7] * 13  # needs 4 blocks

    def run(prompt: list[int]) -> Request:
        (request,) = sim.add(prompt, 1)
        sim.drain(random.Random(0))
        return request

    a = run(p1)
    assert a.num_cached_tokens == 0
    b = run(p2)
    assert b.num_cached_tokens == 0
    assert len(sim.kv.cached) == 4  # two full blocks of each prompt stay cached while free
    assert sim.kv.num_free_blocks == sim.kv.num_blocks

    # Reuse: an identical prompt after its blocks were freed hits the cache; p1 is now the most recent.
    c = run(p1)
    assert c.num_cached_tokens == 8

    # Pressure: p3 takes 4 of the 6 blocks; p2's blocks were used least recently and go first.
    probe1 = make_request("probe1", p1, 1, 0)
    probe2 = make_request("probe2", p2, 1, 0)
    (d,) = sim.add(p3, 1)
    sim.step(random.Random(0))
    sim.check()
    assert len(sim.kv.find_cached_prefix(probe1)) == 2, "the recently used prefix was evicted"
    assert sim.kv.find_cached_prefix(probe2) == [], "the least recently used prefix survived"
    sim.drain(random.Random(0))
    assert d.finished

    e = run(p1)
    assert e.num_cached_tokens == 8
    f = run(p2)
    assert f.num_cached_tokens == 0
    sim.assert_pool_whole()


def test_eviction_takes_the_tail_of_a_freed_prompt_first() -> None:
    sim = _sim(num_blocks=5, block_size=2)
    prompt = [1, 2, 3, 4, 5, 6, 7]  # 3 full blocks + 1 partial
    run = sim.add(prompt, 1)[0]
    sim.drain(random.Random(0))
    assert run.finished and len(sim.kv.cached) == 3
    # A 5-token request needs 3 blocks: the two never-cached ones, then the LRU cached tail block.
    (other,) = sim.add([0] * 5, 1)
    sim.step(random.Random(0))
    sim.check()
    probe = make_request("probe", prompt, 1, 0)
    assert len(sim.kv.find_cached_prefix(probe)) == 2, "the head of the prompt should survive"
    sim.drain(random.Random(0))
    assert other.finished
    sim.assert_pool_whole()


def test_sibling_waits_for_donor_then_shares_prompt_blocks() -> None:
    # Budget 4 tokens: the 10-token prompt takes three chunked-prefill steps.
    sim = _sim(num_blocks=16, block_size=4, budget=4)
    prompt = [1, 2, 3, 4, 5, 6, 7, 0, 1, 2]
    donor, sibling = sim.add(prompt, 3, n=2)
    assert sibling.prefix_donor_id == donor.request_id
    rng = random.Random(0)
    while donor.num_computed_tokens < donor.num_prompt_tokens:
        sim.step(rng)
        sim.check()
        if donor.num_computed_tokens < donor.num_prompt_tokens:
            assert sibling.status == RequestStatus.WAITING and sibling.num_computed_tokens == 0
    out = sim.step(rng)
    sim.check()
    assert sibling.status == RequestStatus.RUNNING
    seq = next(s for s in out.seqs if s.request_id == sibling.request_id)
    assert seq.start_pos == 8  # two full prompt blocks shared, the rest computed
    donor_blocks = sim.kv.blocks_of(donor.request_id)
    assert sim.kv.blocks_of(sibling.request_id)[:2] == donor_blocks[:2]
    assert all(sim.kv.ref_counts[b] == 2 for b in donor_blocks[:2])
    assert sim.kv.blocks_of(sibling.request_id)[2] != donor_blocks[2]  # the partial block is private
    sim.drain(rng)
    assert donor.num_output_tokens == sibling.num_output_tokens == 3
    sim.assert_pool_whole()


def test_sibling_of_finished_donor_does_not_wait_forever() -> None:
    sim = _sim(budget=2)
    donor, sibling = sim.add([1, 2, 3, 4, 5, 6, 7], 2, n=2)
    sim.step(random.Random(0))  # donor computes 2 of 7 prompt tokens
    sim.finish(donor.request_id, RequestStatus.FINISHED_ABORTED)
    sim.check()
    sim.drain(random.Random(0))
    assert sibling.status == RequestStatus.FINISHED_LENGTH
    sim.assert_pool_whole()


def test_preemption_recomputes_and_everything_finishes() -> None:
    # 6 blocks of 2 tokens: two requests that each grow to 11 tokens cannot both stay resident.
    sim = _sim(num_blocks=6, block_size=2, prefix=False)
    a, b = sim.add([1, 2, 3, 4], 7)[0], sim.add([5, 6, 7, 0], 7)[0]
    sim.drain(random.Random(0))
    assert sim.sched.num_preemptions > 0 and sim.num_preempted > 0
    assert b.num_preemptions > 0 and a.num_preemptions == 0  # the newest running request is the victim
    assert a.num_output_tokens == b.num_output_tokens == 7
    sim.assert_pool_whole()


def test_free_twice_is_a_noop_and_the_negative_ref_count_guard_fires() -> None:
    kv = KVCacheManager(8, 2)
    a = make_request("a", [1, 2, 3], 1, 0)
    assert kv.allocate(a, 3)
    blocks = kv.blocks_of("a")
    kv.free(a)
    kv.check_invariants()
    state = (list(kv.ref_counts), list(kv.free_queue))
    kv.free(a)  # the table was popped: nothing left to return
    assert (list(kv.ref_counts), list(kv.free_queue)) == state
    assert kv.num_free_blocks == kv.num_blocks

    # A table that claims blocks nobody counted would drive ref counts negative.
    b = make_request("b", [1, 2, 3], 1, 1)
    assert kv.allocate(b, 3)
    kv.block_tables["ghost"] = list(kv.blocks_of("b"))
    kv.free(b)
    with pytest.raises(RuntimeError, match="freed twice"):
        kv.free(make_request("ghost", [1], 1, 2))
    assert blocks  # a real allocation happened above


def test_finishing_twice_returns_none_and_changes_nothing() -> None:
    sim = _sim()
    (a,) = sim.add([1, 2, 3, 4, 5], 3)
    (b,) = sim.add([1, 2, 3, 4, 6], 3)
    sim.step(random.Random(0))
    sim.finish(a.request_id, RequestStatus.FINISHED_ABORTED)  # also checks the second finish is a no-op
    assert a.status == RequestStatus.FINISHED_ABORTED
    assert sim.sched.finish("never-added", RequestStatus.FINISHED_ABORTED) is None
    sim.check()
    sim.drain(random.Random(0))
    assert b.status == RequestStatus.FINISHED_LENGTH
    sim.assert_pool_whole()


def test_duplicate_request_id_is_rejected() -> None:
    sim = _sim()
    (a,) = sim.add([1, 2], 1)
    with pytest.raises(ValueError, match="already in use"):
        sim.sched.add(make_request(a.request_id, [3], 1, 99))
    sim.drain(random.Random(0))
    sim.assert_pool_whole()


def test_reset_prefix_cache_drops_only_unreferenced_blocks() -> None:
    sim = _sim(block_size=2)
    (a,) = sim.add([1, 2, 3, 4, 5], 1)
    sim.drain(random.Random(0))
    (b,) = sim.add([6, 7, 6, 7, 6], 4)
    sim.step(random.Random(0))
    cached_of_b = {block for block in sim.kv.blocks_of(b.request_id) if sim.kv.block_keys[block] is not None}
    assert cached_of_b
    sim.kv.reset_prefix_cache()
    sim.check()
    assert set(sim.kv.cached.values()) == cached_of_b
    (c,) = sim.add([1, 2, 3, 4, 5], 1)
    sim.drain(random.Random(0))
    assert c.num_cached_tokens == 0
    assert a.finished and b.finished
    sim.assert_pool_whole()
