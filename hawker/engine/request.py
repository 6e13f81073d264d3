"""Per-sequence request state owned by the scheduler."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hawker.outputs import PositionLogprobs
from hawker.sampling_params import SamplingParams

if TYPE_CHECKING:
    from hawker.structured.grammars import SequenceGrammar

# Stands in token_ids for a token sampled by a step still running on the
# device (overlap scheduling): the next step reads it there, not from here.
PENDING_TOKEN = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    # The engine failed on this request (the reason is in RequestOutput.error).
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


@dataclass(eq=False)
class Request:
    """One sequence. A user request with ``n > 1`` becomes ``n`` of these.

    ``token_ids`` holds the prompt followed by every generated token, so a
    request preempted by recompute simply re-prefills ``token_ids``.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int
    arrival_index: int
    parent_id: str | None = None
    sample_index: int = 0
    # A sibling whose full prompt blocks this request reuses (n > 1).
    prefix_donor_id: str | None = None
    token_ids: list[int] = field(default_factory=list)
    # Trailing PENDING_TOKEN entries of token_ids (sampled, not yet read back).
    num_pending_tokens: int = 0
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    # The prefix cache's root hash when this request's chain was started: a
    # weight update moves the cache to a new root, and blocks computed with
    # the old weights stay keyed under the old one, never matched again.
    hash_root: int | None = None
    # Wall-clock times (time.monotonic) for latency metrics.
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # Its place in its structured-output constraint (None when unconstrained).
    grammar: SequenceGrammar | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.wants_prompt_logprobs and not self.prompt_logprobs:
            # The first prompt token has no context. Set here, not when the first prompt
            # logprobs arrive: a one-token prompt has none to compute, yet still needs its entry.
            self.prompt_logprobs = [None]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens, counting pending ones (what the next sample's index is)."""
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose ids are known on the host (all but the pending ones)."""
        return len(self.token_ids) - self.num_pending_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """Generated tokens known on the host."""
        return self.token_ids[self.num_prompt_tokens : self.num_known_tokens]

    @property
    def finished(self) -> bool:
        return self.status.finished

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.sampling_params.prompt_logprobs is not None

    def append_pending_token(self) -> None:
        """A step that samples this sequence was launched; its token is read back later."""
        self.token_ids.append(PENDING_TOKEN)
        self.num_pending_tokens += 1

    def resolve_token(self, token_id: int) -> None:
        """The oldest pending token's id has been read back."""
        assert self.num_pending_tokens > 0, "no pending token to resolve"
        self.token_ids[self.num_known_tokens] = token_id
        self.num_pending_tokens -= 1

    def drop_pending_tokens(self) -> None:
        """Forget tokens of steps whose results will be ignored (the request finished)."""
        del self.token_ids[self.num_known_tokens :]
        self.num_pending_tokens = 0
