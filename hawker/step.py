"""The step contract: what the scheduler asks for and what the model gives back.

One engine step is schedule -> execute -> update (hawker/engine/engine.py).
``Scheduler.schedule`` returns a ``SchedulerOutput``: every sequence that
runs this step, with its tokens, positions and KV blocks. A runner (one
process, or a driver over tensor / pipeline parallel ranks, which sends the
same value to every rank) executes it and returns a ``ModelOutput``: the
token sampled for each sequence that ended its known tokens, with logprobs.
``Scheduler.update`` applies that output. Nothing here holds a tensor, so
both values cross processes as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from hawker.outputs import PositionLogprobs
from hawker.sampling_params import SamplingParams

if TYPE_CHECKING:
    from hawker.structured.masks import StepMasks


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
    """One step's work: the sequences to run and those preempted to make room."""

    seqs: tuple[ScheduledSeq, ...]
    preempted_ids: tuple[str, ...] = ()
    # Token masks of the constrained sequences that sample (filled while the forward runs).
    token_masks: StepMasks | None = None

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)

    @property
    def empty(self) -> bool:
        return not self.seqs


@dataclass(frozen=True)
class SeqResult:
    """What one sequence's step produced."""

    token_id: int | None  # None when this step did not sample (mid-prefill)
    logprobs: PositionLogprobs | None
    prompt_logprobs: list[PositionLogprobs] | None


@dataclass(frozen=True)
class ModelOutput:
    """A step's results by request id (every sequence it ran)."""

    results: dict[str, SeqResult]


class StepHandle(Protocol):
    """A launched step; ``result()`` waits for it and returns what it sampled."""

    def result(self) -> ModelOutput: ...


@dataclass(frozen=True)
class CompletedStep:
    """A step that ran to completion when launched."""

    output: ModelOutput

    def result(self) -> ModelOutput:
        return self.output
