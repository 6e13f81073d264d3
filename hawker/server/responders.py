"""Response bodies of /v1/completions and /v1/chat/completions, whole and streamed.

A response covers one or more engine requests (one per prompt); choice
``index`` is ``prompt_index * n + sample_index``, as in OpenAI's API.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, cast

from hawker.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from hawker.server.formatting import Delta, StreamState, TokenText, chat_logprobs, completion_logprobs, usage
from hawker.server.message_parsing import MessageDelta, MessageStream, MessageSyntax, ToolCall, parse_message


@dataclass
class _Base:
    response_id: str
    model: str
    n: int
    token_text: TokenText
    created: int = field(default_factory=lambda: int(time.time()))
    stream_state: StreamState = field(default_factory=StreamState)

    def choice_index(self, prompt_index: int, completion: CompletionOutput) -> int:
        return prompt_index * self.n + completion.index

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    chunk_kind = ""

    def usage_chunk(self, finals: list[RequestOutput]) -> dict[str, Any]:
        """The last streamed chunk when the client asked for usage: no choices, the usage."""
        return self._envelope(self.chunk_kind, []) | {"usage": usage(finals)}

    def deltas(self, prompt_index: int, output: RequestOutput) -> list[tuple[int, Delta]]:
        found = []
        for completion in output.outputs:
            index = self.choice_index(prompt_index, completion)
            delta = self.stream_state.delta(index, completion)
            if delta is not None:
                found.append((index, delta))
        return found


@dataclass
class CompletionResponder(_Base):
    echo: bool = False
    logprobs: int | None = None
    prompt_texts: list[str] = field(default_factory=list)
    # best_of > n: each prompt ran best_of candidates, of which the n best are shown
    # (never streamed); usage still counts every candidate's tokens, as OpenAI bills them.
    keep_best: bool = False

    kind = "text_completion"
    chunk_kind = "text_completion"

    def begin(self) -> list[dict[str, Any]]:
        return []

    def chunks(self, prompt_index: int, output: RequestOutput) -> list[dict[str, Any]]:
        bodies = []
        for index, delta in self.deltas(prompt_index, output):
            cursor = self.stream_state.cursors[index]
            first = cursor.num_tokens == len(delta.token_ids)  # nothing was sent before this delta
            text = delta.text
            logprobs = None
            if self.echo and first:
                text = self.prompt_texts[prompt_index] + text
            if self.logprobs is not None and delta.logprobs is not None:
                logprobs = self._logprobs(output, delta.token_ids, delta.logprobs, self.echo and first)
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": delta.finish_reason}
            bodies.append(self._envelope(self.chunk_kind, [choice]))
        return bodies

    def _logprobs(
        self, output: RequestOutput, token_ids: list[int], entries: list[PositionLogprobs], with_prompt: bool
    ) -> dict[str, Any]:
        """Logprobs of ``token_ids``, preceded by the prompt's when it is echoed in this piece."""
        all_ids: list[int] = list(token_ids)
        all_entries: list[PositionLogprobs | None] = list(entries)
        if with_prompt and output.prompt_logprobs is not None:
            all_ids = output.prompt_token_ids + all_ids
            all_entries = list(output.prompt_logprobs) + all_entries
        return completion_logprobs(all_ids, all_entries, self.token_text)

    def full(self, finals: list[RequestOutput]) -> dict[str, Any]:
        choices = []
        shown = [best_candidates(output, self.n) for output in finals] if self.keep_best else finals
        for prompt_index, output in enumerate(shown):
            prefix = self.prompt_texts[prompt_index] if self.echo else ""
            for completion in output.outputs:
                logprobs = None
                if self.logprobs is not None and completion.logprobs is not None:
                    logprobs = self._logprobs(output, completion.token_ids, completion.logprobs, self.echo)
                choices.append(
                    {
                        "index": self.choice_index(prompt_index, completion),
                        "text": prefix + completion.text,
                        "logprobs": logprobs,
                        "finish_reason": completion.finish_reason,
                        "stop_reason": completion.stop_reason,
                    }
                )
        choices.sort(key=lambda choice: cast(int, choice["index"]))
        return self._envelope(self.kind, choices) | {"usage": usage(finals)}


def best_candidates(output: RequestOutput, n: int) -> RequestOutput:
    """``output`` with only its ``n`` best completions, re-indexed best first.

    Best is OpenAI's ``best_of`` rule: the highest log probability per token
    (the mean logprob of the tokens the sampler chose).
    """
    ranked = sorted(output.outputs, key=_mean_logprob, reverse=True)[:n]
    kept = [dataclasses.replace(completion, index=index) for index, completion in enumerate(ranked)]
    return dataclasses.replace(output, outputs=kept)


def _mean_logprob(completion: CompletionOutput) -> float:
    entries = completion.logprobs or []
    pairs = zip(completion.token_ids, entries, strict=False)  # no entries at all if logprobs were off
    chosen = [entry[token].logprob for token, entry in pairs if token in entry]
    return sum(chosen) / len(chosen) if chosen else -math.inf


@dataclass
class ChatResponder(_Base):
    top_logprobs: int | None = None  # None: no logprobs
    # How the text becomes a message (reasoning, tool calls); None: all of it is the content.
    syntax: MessageSyntax | None = None
    _messages: dict[int, MessageStream] = field(default_factory=dict)

    kind = "chat.completion"
    chunk_kind = "chat.completion.chunk"

    def _choice_syntax(self, syntax: MessageSyntax, index: int) -> MessageSyntax:
        """With several choices, each numbers its calls under its own prefix: ids stay unique in a response."""
        return syntax if self.n == 1 else dataclasses.replace(syntax, call_id_prefix=f"{syntax.call_id_prefix}_{index}")

    def begin(self) -> list[dict[str, Any]]:
        """OpenAI streams open every choice with a delta holding only the role."""
        return [
            self._envelope(
                self.chunk_kind,
                [
                    {
                        "index": index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            )
            for index in range(self.n)
        ]

    def chunks(self, prompt_index: int, output: RequestOutput) -> list[dict[str, Any]]:
        bodies = []
        for completion in output.outputs:
            index = self.choice_index(prompt_index, completion)
            delta = self.stream_state.delta(index, completion)
            if delta is None:
                continue
            logprobs = None
            if self.top_logprobs is not None and delta.logprobs is not None:
                logprobs = chat_logprobs(delta.token_ids, delta.logprobs, self.token_text, self.top_logprobs)
            fields, called = self._delta_fields(index, completion, delta)
            if not fields and logprobs is None and delta.finish_reason is None:
                continue  # the parser holds this text back until it knows what it is
            finish_reason = _finish_reason(delta.finish_reason, called)
            choice = {"index": index, "delta": fields, "logprobs": logprobs, "finish_reason": finish_reason}
            bodies.append(self._envelope(self.chunk_kind, [choice]))
        return bodies

    def _delta_fields(self, index: int, completion: CompletionOutput, delta: Delta) -> tuple[dict[str, Any], bool]:
        """The message fields of a streamed delta, and whether the message has tool calls so far."""
        if self.syntax is None:
            return ({"content": delta.text} if delta.text else {}), False
        stream = self._messages.setdefault(index, MessageStream(self._choice_syntax(self.syntax, index)))
        parsed = stream.update(completion.text, final=delta.finish_reason is not None)
        first_call = len(stream.message.tool_calls) - len(parsed.tool_calls)
        return _delta_json(parsed, first_call), bool(stream.message.tool_calls)

    def full(self, finals: list[RequestOutput]) -> dict[str, Any]:
        choices = []
        for prompt_index, output in enumerate(finals):
            for completion in output.outputs:
                logprobs = None
                if self.top_logprobs is not None and completion.logprobs is not None:
                    logprobs = chat_logprobs(
                        completion.token_ids, completion.logprobs, self.token_text, self.top_logprobs
                    )
                index = self.choice_index(prompt_index, completion)
                message, called = self._message(completion.text, index)
                choices.append(
                    {
                        "index": index,
                        "message": message,
                        "logprobs": logprobs,
                        "finish_reason": _finish_reason(completion.finish_reason, called),
                        "stop_reason": completion.stop_reason,
                    }
                )
        choices.sort(key=lambda choice: cast(int, choice["index"]))
        return self._envelope(self.kind, choices) | {"usage": usage(finals)}

    def _message(self, text: str, index: int) -> tuple[dict[str, Any], bool]:
        if self.syntax is None:
            return {"role": "assistant", "content": text}, False
        parsed = parse_message(text, self._choice_syntax(self.syntax, index), final=True)
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
        if parsed.reasoning is not None:
            message["reasoning_content"] = parsed.reasoning
        if parsed.tool_calls:
            message["tool_calls"] = [_call_json(call) for call in parsed.tool_calls]
        return message, bool(parsed.tool_calls)


def _finish_reason(reason: str | None, called: bool) -> str | None:
    """OpenAI's "tool_calls" when the model stopped after calling tools."""
    return "tool_calls" if reason == "stop" and called else reason


def _call_json(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {} if index is None else {"index": index}
    return body | {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _delta_json(delta: MessageDelta, first_call: int) -> dict[str, Any]:
    """A streamed delta in OpenAI's chunk shape (a call comes whole: id, name and arguments in one piece)."""
    fields: dict[str, Any] = {}
    if delta.reasoning:
        fields["reasoning_content"] = delta.reasoning
    if delta.content:
        fields["content"] = delta.content
    if delta.tool_calls:
        fields["tool_calls"] = [_call_json(call, first_call + k) for k, call in enumerate(delta.tool_calls)]
    return fields


# What turns a generation's outputs into response bodies.
Responder = CompletionResponder | ChatResponder
