"""Continuous batching under a token budget, chunked prefill, preemption.

Each step running requests go first (decodes and unfinished prefill chunks,
oldest first), then waiting requests are admitted while the token budget,
``max_num_seqs`` and the KV pool allow. When the pool runs dry the newest
running request is preempted by recompute: its blocks go back to the pool
and it later re-prefills prompt + generated tokens from scratch.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from hawker.config import SchedulerConfig
from hawker.engine.kv_cache import KVCacheManager
from hawker.engine.request import Request, RequestStatus
from hawker.sampling_params import SamplingParams


@dataclass(frozen=True)
class ScheduledSeq:
    """Everything the model runner needs about one sequence for one step."""

    request_id: str
    token_ids: tuple[int, ...]  # the tokens to compute this step
    start_pos: int  # position of token_ids[0]
    block_table: tuple[int, ...]
    sample: bool  # this chunk ends at the last known token: sample the next
    sampling_params: SamplingParams
    sample_index: int
    output_index: int  # how many tokens this sequence has generated so far
    num_prompt_tokens: int
    # All tokens so far; only sent when the request uses penalties.
    history: tuple[int, ...] = ()
    # Next-token targets of this chunk's positions, for prompt logprobs.
    prompt_logprob_targets: tuple[int, ...] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    seqs: tuple[ScheduledSeq, ...]
    preempted_ids: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)

    @property
    def empty(self) -> bool:
        return not self.seqs


@dataclass
class _StepBudget:
    tokens: int
    preempted: list[str] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # --------------------------------------------------------------- requests
    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish(self, request_id: str, status: RequestStatus, reason: int | str | None = None) -> Request | None:
        """Finish (or abort) a request at any point; all its blocks return to the pool."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        request.stop_reason = reason
        request.drop_pending_tokens()
        self.kv.free(request)
        return request

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # --------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        budget = _StepBudget(tokens=self.config.max_num_batched_tokens)
        seqs: list[ScheduledSeq] = []
        self._schedule_running(budget, seqs)
        if not budget.preempted:
            self._admit_waiting(budget, seqs)
        return SchedulerOutput(seqs=tuple(seqs), preempted_ids=tuple(budget.preempted))

    def _schedule_running(self, budget: _StepBudget, seqs: list[ScheduledSeq]) -> None:
        index = 0
        while index < len(self.running) and budget.tokens > 0:
            request = self.running[index]
            if self._finishes_on_pending_token(request):
                index += 1  # it stops when that token is read back; nothing more to compute
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget.tokens)
            while not self.kv.allocate(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                budget.preempted.append(victim.request_id)
                if victim is request:
                    return
            seqs.append(self._scheduled(request, num_new))
            budget.tokens -= num_new
            index += 1

    def _finishes_on_pending_token(self, request: Request) -> bool:
        """Its pending token (sampled by the step in flight) reaches max_tokens or max_model_len."""
        return request.num_pending_tokens > 0 and (
            request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.config.max_model_len
        )

    def _admit_waiting(self, budget: _StepBudget, seqs: list[ScheduledSeq]) -> None:
        skipped: list[Request] = []
        while self.waiting and budget.tokens > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting.popleft()
            # A preempted request re-prefills its tokens, so they must all be known.
            if request.num_pending_tokens or self._waits_for_donor(request):
                skipped.append(request)
                continue
            computed = self._reusable_prefix(request)
            num_computed = len(computed) * self.kv.block_size
            num_new = min(request.num_tokens - num_computed, budget.tokens)
            if not self.kv.allocate(request, num_new, computed):
                self.waiting.appendleft(request)
                break
            if request.prefix_donor_id is None:
                self.kv.record_prefix_lookup(request.num_tokens, num_computed)
            request.num_computed_tokens = num_computed
            request.num_cached_tokens = max(request.num_cached_tokens, num_computed)
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:  # not on a resume after preemption
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            seqs.append(self._scheduled(request, num_new))
            budget.tokens -= num_new
        self.waiting.extendleft(reversed(skipped))

    def _waits_for_donor(self, request: Request) -> bool:
        """n > 1 siblings wait until the first sample has computed the prompt."""
        donor = self.requests.get(request.prefix_donor_id or "")
        return donor is not None and donor.num_computed_tokens < donor.num_prompt_tokens

    def _reusable_prefix(self, request: Request) -> list[int]:
        donor = self.requests.get(request.prefix_donor_id or "")
        if donor is not None and donor.status == RequestStatus.RUNNING:
            # Share the sibling's full prompt blocks (never written again).
            num_shared = min((request.num_tokens - 1) // self.kv.block_size, len(self.kv.blocks_of(donor.request_id)))
            num_shared = min(num_shared, donor.num_prompt_tokens // self.kv.block_size)
            return self.kv.blocks_of(donor.request_id)[:num_shared]
        return self.kv.find_cached_prefix(request)

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def _scheduled(self, request: Request, num_new: int) -> ScheduledSeq:
        start = request.num_computed_tokens
        end = start + num_new
        params = request.sampling_params
        targets = None
        if request.wants_prompt_logprobs and start < request.num_prompt_tokens:
            targets = tuple(request.token_ids[start + 1 : min(end + 1, request.num_prompt_tokens)])
        return ScheduledSeq(
            request_id=request.request_id,
            token_ids=tuple(request.token_ids[start:end]),
            start_pos=start,
            block_table=tuple(self.kv.blocks_of(request.request_id)),
            sample=end == request.num_tokens,
            sampling_params=params,
            sample_index=request.sample_index,
            output_index=request.num_output_tokens,
            num_prompt_tokens=request.num_prompt_tokens,
            history=tuple(request.token_ids) if params.uses_penalties else (),
            prompt_logprob_targets=targets,
        )

    # ----------------------------------------------------------------- update
    def commit_step(self, output: SchedulerOutput) -> list[Request]:
        """Advance computed-token counts of a launched step; returns the requests it samples.

        Each of them gets a pending token at once, so that the next step can
        be scheduled before this one's tokens are read back (``resolve_token``).
        """
        sampled: list[Request] = []
        for seq in output.seqs:
            request = self.requests.get(seq.request_id)
            if request is None:  # aborted while the step ran
                continue
            request.num_computed_tokens += seq.num_tokens
            self.kv.cache_full_blocks(request)
            if seq.sample:
                request.append_pending_token()
                sampled.append(request)
        return sampled
