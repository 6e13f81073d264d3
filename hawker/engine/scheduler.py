"""Continuous batching under a token budget, chunked prefill, preemption; and each step's update.

Each step running requests go first (decodes and unfinished prefill chunks,
oldest first), then waiting requests are admitted while the token budget,
``max_num_seqs`` and the KV pool allow. When the pool runs dry the newest
running request is preempted by recompute: its blocks go back to the pool
and it later re-prefills prompt + generated tokens from scratch.

The update half of a step is here too: ``commit`` advances the requests past
a launched step (each sampled one gets a pending token, so that the next
step can be scheduled before this one's tokens are read back), ``update``
applies the read-back tokens and logprobs, stops requests (``check_stop``)
and frees their blocks. Stop strings need the text: the output processor
(hawker/engine/output_processor.py) checks those.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from hawker.config import SchedulerConfig
from hawker.engine.kv_cache import KVCacheManager
from hawker.engine.request import Request, RequestStatus
from hawker.outputs import PositionLogprobs
from hawker.step import ModelOutput, ScheduledSeq, SchedulerOutput


@dataclass(frozen=True)
class CommittedStep:
    """A launched step as the scheduler advanced past it; its tokens are pending until ``update``."""

    scheduled: SchedulerOutput
    requests: dict[str, Request]  # its sequences' requests when it was launched
    sampled: list[Request]  # those it gave a pending token, in order


@dataclass
class _StepBudget:
    tokens: int
    preempted: list[str] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, eos_token_id: int | None = None) -> None:
        self.config = config
        self.kv = kv
        self.eos_token_id = eos_token_id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_prompt_tokens = 0  # computed, over every step (recomputes included)
        self.num_generation_tokens = 0

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
    def commit(self, scheduled: SchedulerOutput) -> CommittedStep:
        """Advance computed-token counts past a launched step; each request it samples gets a pending token."""
        requests: dict[str, Request] = {}
        sampled: list[Request] = []
        for seq in scheduled.seqs:
            request = self.requests.get(seq.request_id)
            if request is None:  # aborted while the step ran
                continue
            requests[seq.request_id] = request
            request.num_computed_tokens += seq.num_tokens
            self.kv.cache_full_blocks(request)
            if seq.sample:
                request.append_pending_token()
                sampled.append(request)
        return CommittedStep(scheduled, requests, sampled)

    def update(self, step: CommittedStep, output: ModelOutput) -> list[tuple[Request, int]]:
        """Apply a step's read-back results; returns each still-live request with its new token.

        A request that finished (stopped, aborted) while the step ran is left
        alone. One that stops on its new token (``check_stop``) is finished
        here and its blocks go back to the pool.
        """
        for seq in step.scheduled.seqs:
            result = output.results.get(seq.request_id)
            request = step.requests.get(seq.request_id)
            if request is not None and result is not None and result.prompt_logprobs and self._is_live(request):
                record_prompt_logprobs(request, seq.start_pos, result.prompt_logprobs)
        self.num_prompt_tokens += sum(
            max(0, min(s.start_pos + s.num_tokens, s.num_prompt_tokens) - s.start_pos) for s in step.scheduled.seqs
        )
        advanced: list[tuple[Request, int]] = []
        now = time.monotonic()
        for request in step.sampled:
            if not self._is_live(request):
                continue
            result = output.results[request.request_id]
            token = result.token_id
            assert token is not None, "a sampling sequence always gets a token"
            request.resolve_token(token)
            self.kv.cache_full_blocks(request)  # the block holding it may be computed already
            self.num_generation_tokens += 1
            if request.first_token_time is None:
                request.first_token_time = now
            if result.logprobs is not None:
                request.logprobs.append(result.logprobs)
            if request.grammar is not None:
                request.grammar.accept(token)
            stop = check_stop(request, token, self.eos_token_id, self.config.max_model_len)
            if stop is not None:
                self.finish(request.request_id, *stop)
            advanced.append((request, token))
        return advanced

    def _is_live(self, request: Request) -> bool:
        return self.requests.get(request.request_id) is request


def below_min_tokens(request: Request) -> bool:
    """Fewer known output tokens than ``min_tokens``: no stop condition but the length applies yet."""
    # Known tokens only: with overlap scheduling the next one may be pending already.
    return request.num_known_tokens - request.num_prompt_tokens < request.sampling_params.min_tokens


def check_stop(
    request: Request, token: int, eos_token_id: int | None, max_model_len: int
) -> tuple[RequestStatus, int | None] | None:
    """Whether ``request`` stops on ``token``, its newest known one: (status, stop reason), or None."""
    params = request.sampling_params
    if not below_min_tokens(request):
        if token == eos_token_id and not params.ignore_eos:
            return RequestStatus.FINISHED_STOPPED, None
        if token in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED, token
    num_output = request.num_known_tokens - request.num_prompt_tokens
    if num_output >= request.max_tokens or request.num_known_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH, None
    if request.grammar is not None and request.grammar.complete:
        return RequestStatus.FINISHED_STOPPED, None  # the constraint is satisfied and allows nothing more
    return None


def record_prompt_logprobs(request: Request, start_pos: int, entries: list[PositionLogprobs]) -> None:
    """Store logprobs of prompt tokens start_pos+1 ...; a recompute after preemption adds nothing twice."""
    if not request.prompt_logprobs:
        request.prompt_logprobs.append(None)  # the first prompt token has no context
    for offset, entry in enumerate(entries):
        if start_pos + 1 + offset == len(request.prompt_logprobs):
            request.prompt_logprobs.append(entry)
