"""The chat responder with a message syntax: reasoning and tool calls in the whole message, and streamed
chunks (in OpenAI's shape) that add up to it, however the engine's outputs were split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hawker.loader.tokenizer import load_tokenizer
from hawker.outputs import CompletionOutput, RequestOutput
from hawker.server.formatting import TokenText
from hawker.server.message_parsing import MessageSyntax
from hawker.server.responders import ChatResponder

CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
TEXTS = [
    ("<think>Add them.</think>\n\n" + CALL, "stop"),
    ("<think>Just answer.</think>\n\nIt is 3.", "stop"),
    ("<think>still thinking about it", "length"),
    ("No reasoning here. " + CALL + "\n" + CALL, "stop"),
    ('Cut short: <tool_call>\n{"name": "add"', "length"),
]


def outputs(text: str, finish: str, cuts: list[int]) -> list[RequestOutput]:
    """The engine's outputs of one generation: the text so far at each cut, then the finished whole."""
    pieces = [text[:cut] for cut in sorted(set(cuts)) if 0 < cut < len(text)] + [text]
    return [
        RequestOutput(
            "r",
            None,
            [1],
            [CompletionOutput(0, piece, list(range(len(piece))), finish_reason=finish if last else None)],
            finished=last,
        )
        for last, piece in ((i == len(pieces) - 1, piece) for i, piece in enumerate(pieces))
    ]


def responder(tiny_checkpoints: dict[str, Path]) -> ChatResponder:
    syntax = MessageSyntax(reasoning=True, reasoning_open=False, tools=True, call_id_prefix="call_x")
    text = TokenText(load_tokenizer(tiny_checkpoints["llama"]))
    return ChatResponder(response_id="chatcmpl-x", model="m", n=1, token_text=text, syntax=syntax)


def reassemble(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": None}
    finish = None
    for chunk in chunks:
        choice = chunk["choices"][0]
        delta = choice["delta"]
        for key in ("reasoning_content", "content"):
            if key in delta:
                message[key] = (message.get(key) or "") + delta[key]
        for call in delta.get("tool_calls", []):
            message.setdefault("tool_calls", []).append({k: v for k, v in call.items() if k != "index"})
            assert call["index"] == len(message["tool_calls"]) - 1
        finish = choice["finish_reason"] or finish
    return {"message": message, "finish_reason": finish}


@pytest.mark.parametrize(("text", "finish"), TEXTS)
@pytest.mark.parametrize("cuts", [[], [1, 2, 3, 5, 8, 13, 21, 34, 55], list(range(0, 120, 7))])
def test_streamed_chunks_add_up_to_the_whole_message(
    tiny_checkpoints: dict[str, Path], text: str, finish: str, cuts: list[int]
) -> None:
    stream = outputs(text, finish, cuts)
    whole = responder(tiny_checkpoints).full([stream[-1]])["choices"][0]
    streaming = responder(tiny_checkpoints)
    chunks = [chunk for output in stream for chunk in streaming.chunks(0, output)]
    assert reassemble(chunks) == {"message": whole["message"], "finish_reason": whole["finish_reason"]}


def test_the_whole_message_has_reasoning_calls_and_finish_reason(tiny_checkpoints: dict[str, Path]) -> None:
    full = responder(tiny_checkpoints).full([outputs(*TEXTS[0], [])[-1]])["choices"][0]
    assert full["message"]["reasoning_content"] == "Add them."
    assert full["message"]["content"] is None and full["finish_reason"] == "tool_calls"
    [call] = full["message"]["tool_calls"]
    assert call == {"id": "call_x_0", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    assert json.loads(call["function"]["arguments"]) == {"a": 1, "b": 2}
    cut = responder(tiny_checkpoints).full([outputs(*TEXTS[2], [])[-1]])["choices"][0]
    assert cut["message"] == {"role": "assistant", "content": None, "reasoning_content": "still thinking about it"}
    assert cut["finish_reason"] == "length"


def test_call_ids_are_unique_across_choices(tiny_checkpoints: dict[str, Path]) -> None:
    two = responder(tiny_checkpoints)
    two.n = 2
    text = "No reasoning here. " + CALL
    output = RequestOutput("r", None, [1], [CompletionOutput(i, text, [1], finish_reason="stop") for i in range(2)])
    ids = [call["id"] for choice in two.full([output])["choices"] for call in choice["message"]["tool_calls"]]
    assert len(ids) == len(set(ids)) == 2
