"""Turn the text a chat model generated into an OpenAI assistant message.

A model writes one stream of text; the API answers with ``reasoning_content``, ``content`` and
``tool_calls``. Two parsers may be on, per the model's chat format:

* reasoning: a ``<think>...</think>`` block at the start of the output (or, when the prompt already
  opened the block, as DeepSeek-R1's template does, everything up to ``</think>``);
* tools (Hermes/Qwen): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks anywhere in
  the rest.

``parse_message`` parses a whole text. Called mid-stream (``final=False``) it returns only what is
settled: whatever more text could still change the meaning of is held back. That makes successive
results grow only by appending, so ``MessageStream`` can stream the difference, and the streamed
deltas add up to exactly the non-streamed message however the text was split into chunks.

Choices the format leaves open:

* A ``<tool_call>`` block ends at the first ``</tool_call>``, even one inside a JSON string of the
  body; that body is then incomplete JSON, so the block is plain text. Scanning JSON strings for the
  tag instead would let one stray quote hold back the rest of a stream until its end.
* A body is a call only if it is a JSON object with a non-empty string ``"name"`` and an object
  ``"arguments"`` (or ``"parameters"``), or a string holding a JSON object's text. NaN and Infinity
  are not JSON, so a body using them is plain text too.
* With ``reasoning_open`` a leading ``<think>`` is still dropped: some models write it anyway.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
_CALL_OPEN = "<tool_call>"
_CALL_CLOSE = "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object


@dataclass(frozen=True)
class ParsedMessage:
    reasoning: str | None  # None: the output had no reasoning block
    content: str | None
    tool_calls: tuple[ToolCall, ...]


@dataclass(frozen=True)
class MessageSyntax:
    reasoning: bool  # parse a <think>...</think> block
    reasoning_open: bool  # the prompt ended inside the think block: output starts as reasoning
    tools: bool  # parse Hermes/Qwen <tool_call> blocks
    call_id_prefix: str  # the k-th call (from 0) gets the id f"{call_id_prefix}_{k}"


@dataclass(frozen=True)
class MessageDelta:
    """What a parse added to the previous one: text to append, and whole new calls."""

    reasoning: str
    content: str
    tool_calls: tuple[ToolCall, ...]

    @property
    def empty(self) -> bool:
        return not (self.reasoning or self.content or self.tool_calls)


def parse_message(text: str, syntax: MessageSyntax, final: bool) -> ParsedMessage:
    """The message in ``text``; with ``final=False`` only the part more text cannot change."""
    reasoning, rest = _split_reasoning(text, syntax, final)
    if rest is None:
        return ParsedMessage(reasoning, None, ())
    if syntax.tools:
        content, calls = _parse_tool_calls(rest, syntax.call_id_prefix, final)
        return ParsedMessage(reasoning, content, calls)
    if not syntax.reasoning:
        # No parser at all: the text is the answer, as it would be for a plain completion.
        return ParsedMessage(None, rest, ())
    return ParsedMessage(reasoning, rest or None, ())


class MessageStream:
    """Streams one response: each update gets the whole text so far and answers what is new.

    Each text must extend the previous one. Re-parsing the whole text costs time linear in its
    length per update, which keeps the streamed and whole-response messages identical by construction.
    """

    def __init__(self, syntax: MessageSyntax) -> None:
        self._syntax = syntax
        self._last = ParsedMessage(None, None, ())
        self._finished = False

    @property
    def message(self) -> ParsedMessage:
        """Everything streamed so far, as one message."""
        return self._last

    def update(self, text: str, final: bool) -> MessageDelta:
        if self._finished:
            raise RuntimeError("the stream already had its final update")
        parsed = parse_message(text, self._syntax, final)
        delta = _difference(self._last, parsed)
        self._last = parsed
        self._finished = final
        return delta


def _split_reasoning(text: str, syntax: MessageSyntax, final: bool) -> tuple[str | None, str | None]:
    """(reasoning, the rest for content and calls); the rest is None when nothing follows reasoning yet."""
    if not syntax.reasoning:
        return None, text
    opened_by_text = text.startswith(THINK_OPEN)
    if not final and not opened_by_text and THINK_OPEN.startswith(text):
        # The text may still become "<think>", which decides whether there is reasoning at all.
        return ("" if syntax.reasoning_open else None), None
    if not (syntax.reasoning_open or opened_by_text):
        return None, text
    start = len(THINK_OPEN) if opened_by_text else 0
    end = text.find(THINK_CLOSE, start)
    if end >= 0:
        return text[start:end], text[end + len(THINK_CLOSE) :].lstrip()
    if final:
        # A model cut off mid-thought (length limit) answered nothing but reasoning.
        return text[start:], None
    return text[start : len(text) - _partial_tag_length(text, THINK_CLOSE, start)], None


def _parse_tool_calls(text: str, id_prefix: str, final: bool) -> tuple[str | None, tuple[ToolCall, ...]]:
    """(content, calls): the text outside the parsed calls, stripped, and the calls in order."""
    pieces: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while True:
        open_at = text.find(_CALL_OPEN, pos)
        if open_at < 0:
            # A tail like "<tool_" may yet open a block: not text until it cannot.
            held = 0 if final else _partial_tag_length(text, _CALL_OPEN, pos)
            pieces.append(text[pos : len(text) - held])
            break
        pieces.append(text[pos:open_at])
        body_at = open_at + len(_CALL_OPEN)
        close_at = text.find(_CALL_CLOSE, body_at)
        if close_at < 0:
            # Mid-stream an open block is held whole; a response that ends inside one wrote text.
            if final:
                pieces.append(text[open_at:])
            break
        end = close_at + len(_CALL_CLOSE)
        call = _read_call(text[body_at:close_at], f"{id_prefix}_{len(calls)}")
        if call is None:
            pieces.append(text[open_at:end])
        else:
            calls.append(call)
        pos = end
    # Mid-stream, stripping holds back trailing whitespace: it is content only if text follows it.
    return "".join(pieces).strip() or None, tuple(calls)


def _read_call(body: str, call_id: str) -> ToolCall | None:
    """The call a block's body describes, or None when it is not one (the block is then text)."""
    value = _load_json(body)
    if not isinstance(value, dict):
        return None
    name = value.get("name")
    arguments = value["arguments"] if "arguments" in value else value.get("parameters")
    if not isinstance(name, str) or not name:
        return None
    if isinstance(arguments, dict):
        return ToolCall(call_id, name, json.dumps(arguments, ensure_ascii=False))
    if isinstance(arguments, str) and isinstance(_load_json(arguments), dict):
        # Already JSON text: passed on as written, so the client sees what the model wrote.
        return ToolCall(call_id, name, arguments)
    return None


def _load_json(text: str) -> object:
    """The JSON value of ``text``, or None when it is not strict JSON."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser allows
        return None


def _reject_constant(name: str) -> object:
    # Python's decoder accepts NaN and Infinity; JSON (and so a client's decoder) does not.
    raise ValueError(f"{name} is not JSON")


def _partial_tag_length(text: str, tag: str, start: int) -> int:
    """The length of the longest proper prefix of ``tag`` that ``text[start:]`` ends with."""
    for size in range(min(len(tag) - 1, len(text) - start), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


def _difference(old: ParsedMessage, new: ParsedMessage) -> MessageDelta:
    # Parse results only grow by appending (tested, not checked here: it would cost a compare of
    # the whole text per update), so what is new is what lies past the old lengths.
    return MessageDelta(
        reasoning=(new.reasoning or "")[len(old.reasoning or "") :],
        content=(new.content or "")[len(old.content or "") :],
        tool_calls=new.tool_calls[len(old.tool_calls) :],
    )
