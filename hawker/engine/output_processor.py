"""Requests' outputs: incremental text, stop strings and ``RequestOutput``s.

A user request with ``n > 1`` is a group of ``n`` sequences (``Request``s);
each has its own detokenizer. After the scheduler applies a step's tokens
(``Scheduler.update``), ``tokens_added`` detokenizes each new token, stops a
sequence whose text now holds a stop string, and builds one ``RequestOutput``
per group that changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from hawker.engine.detokenizer import IncrementalDetokenizer
from hawker.engine.request import Request, RequestStatus
from hawker.engine.scheduler import Scheduler, below_min_tokens
from hawker.outputs import CompletionOutput, RequestOutput


@dataclass
class RequestGroup:
    """The sequences of one user request and their detokenizers."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Request]
    detokenizers: list[IncrementalDetokenizer]

    @property
    def finished(self) -> bool:
        return all(seq.finished for seq in self.seqs)


class OutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, scheduler: Scheduler) -> None:
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.groups: dict[str, RequestGroup] = {}

    def add(self, request_id: str, prompt: str | None, seqs: list[Request]) -> None:
        """Track a new request's sequences (all of one prompt and sampling parameters)."""
        params = seqs[0].sampling_params
        prompt_token_ids = seqs[0].prompt_token_ids
        detokenizers = [
            IncrementalDetokenizer.for_prompt(
                self.tokenizer,
                prompt_token_ids,
                params.skip_special_tokens,
                params.stop,
                params.include_stop_str_in_output,
            )
            for _ in seqs
        ]
        self.groups[request_id] = RequestGroup(request_id, prompt, list(prompt_token_ids), seqs, detokenizers)

    def group_of(self, request: Request) -> RequestGroup:
        return self.groups[request.parent_id or request.request_id]

    def tokens_added(self, advanced: Sequence[tuple[Request, int]], weight_version: int) -> list[RequestOutput]:
        """Detokenize each (request, new token), stop on stop strings; the outputs of the groups that changed."""
        touched: dict[str, RequestGroup] = {}
        for request, token in advanced:
            group = self.group_of(request)
            stop_string = group.detokenizers[request.sample_index].add_token(token)
            if stop_string is not None and not below_min_tokens(request):
                self._stop_on_string(request, stop_string)
            touched[group.request_id] = group
        return [self.output(group, weight_version) for group in touched.values()]

    def _stop_on_string(self, request: Request, stop_string: str) -> None:
        # A stop string outranks the other reasons to stop on the same token (end of sequence, length).
        if not request.finished:
            self.scheduler.finish(request.request_id, RequestStatus.FINISHED_STOPPED, stop_string)
        else:
            request.status, request.stop_reason = RequestStatus.FINISHED_STOPPED, stop_string

    def output(self, group: RequestGroup, weight_version: int) -> RequestOutput:
        """The group's output so far; a finished group is forgotten."""
        completions = [
            CompletionOutput(
                index=seq.sample_index,
                text=detok.text if seq.finished else detok.streamable_text(),
                token_ids=list(seq.output_token_ids),
                logprobs=list(seq.logprobs) if seq.sampling_params.logprobs is not None else None,
                finish_reason=seq.status.value if seq.finished else None,
                stop_reason=seq.stop_reason,
            )
            for seq, detok in zip(group.seqs, group.detokenizers, strict=True)
        ]
        finished = group.finished
        first = group.seqs[0]
        if finished:
            del self.groups[group.request_id]
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            outputs=completions,
            prompt_logprobs=list(first.prompt_logprobs) if first.wants_prompt_logprobs else None,
            finished=finished,
            num_cached_tokens=first.num_cached_tokens,
            metrics=_timings(first),
            weight_version=weight_version,
        )


def _timings(request: Request) -> dict[str, float]:
    times = {
        "arrival_time": request.arrival_time,
        "first_scheduled_time": request.first_scheduled_time,
        "first_token_time": request.first_token_time,
    }
    return {name: value for name, value in times.items() if value is not None}
