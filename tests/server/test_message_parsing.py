"""Parsing generated text into an assistant message (hawker/server/message_parsing.py), whole and streamed."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hawker.server.message_parsing import (
    MessageDelta,
    MessageStream,
    MessageSyntax,
    ParsedMessage,
    ToolCall,
    parse_message,
)

PLAIN = MessageSyntax(reasoning=False, reasoning_open=False, tools=False, call_id_prefix="c")
THINK = MessageSyntax(reasoning=True, reasoning_open=False, tools=False, call_id_prefix="c")
R1 = MessageSyntax(reasoning=True, reasoning_open=True, tools=False, call_id_prefix="c")
TOOLS = MessageSyntax(reasoning=False, reasoning_open=False, tools=True, call_id_prefix="c")
THINK_TOOLS = MessageSyntax(reasoning=True, reasoning_open=False, tools=True, call_id_prefix="c")
ALL_SYNTAXES = [
    MessageSyntax(reasoning=r, reasoning_open=o, tools=t, call_id_prefix="call_x")
    for r, o, t in itertools.product([False, True], repeat=3)
]

CALL_F = '<tool_call>\n{"name": "f", "arguments": {"city": "Zürich", "n": 1}}\n</tool_call>'
F_ARGS = json.dumps({"city": "Zürich", "n": 1}, ensure_ascii=False)
CALL_G = '<tool_call>{"name": "g", "parameters": {}}</tool_call>'


def msg(reasoning: str | None, content: str | None, *calls: ToolCall) -> ParsedMessage:
    return ParsedMessage(reasoning, content, tuple(calls))


# Rule 1: reasoning.


@pytest.mark.parametrize(
    ("text", "final", "expected"),
    [
        ("<think>plan</think>answer", True, msg("plan", "answer")),
        ("<think> plan \n</think>\n\n  answer ", True, msg(" plan \n", "answer ")),  # raw reasoning
        ("<think>plan</think>", True, msg("plan", None)),
        ("<think></think>", True, msg("", None)),
        ("<think>cut off mid-thought", True, msg("cut off mid-thought", None)),
        ("<think>cut off </thi", True, msg("cut off </thi", None)),
        ("<think>still thinking </thi", False, msg("still thinking ", None)),
        ("<think>still thinking </think>  ", False, msg("still thinking ", None)),
        ("<think>a <", False, msg("a ", None)),
        ("<think>a < b", False, msg("a < b", None)),
        ("answer without reasoning", True, msg(None, "answer without reasoning")),
        (" <think>not at the start</think>", True, msg(None, " <think>not at the start</think>")),
        ("", True, msg(None, None)),
        ("", False, msg(None, None)),
        ("<thi", False, msg(None, None)),  # may still become <think>
        ("<thi", True, msg(None, "<thi")),
        ("<thx", False, msg(None, "<thx")),
        ("<think>", False, msg("", None)),
    ],
)
def test_reasoning(text: str, final: bool, expected: ParsedMessage) -> None:
    assert parse_message(text, THINK, final) == expected


@pytest.mark.parametrize(
    ("text", "final", "expected"),
    [
        ("plan</think>answer", True, msg("plan", "answer")),
        ("plan", True, msg("plan", None)),
        ("plan</th", False, msg("plan", None)),
        ("", False, msg("", None)),  # reasoning is known to exist before any text
        ("", True, msg("", None)),
        ("<think>plan</think>answer", True, msg("plan", "answer")),  # a model that writes the tag anyway
        ("<thi", False, msg("", None)),
        ("<thi", True, msg("<thi", None)),
        ("</think>", True, msg("", None)),
    ],
)
def test_reasoning_opened_by_the_prompt(text: str, final: bool, expected: ParsedMessage) -> None:
    assert parse_message(text, R1, final) == expected


def test_reasoning_off_leaves_think_tags_in_content() -> None:
    assert parse_message("<think>x</think>y", PLAIN, True) == msg(None, "<think>x</think>y")
    assert parse_message("<think>x</think>y", TOOLS, True) == msg(None, "<think>x</think>y")


# Rule 2: no tools.


@pytest.mark.parametrize("final", [False, True])
def test_without_parsers_content_is_the_text_exactly(final: bool) -> None:
    for text in ["", "  padded \n", "<tool_call>{}</tool_call>", "<thi", "héllo 🙂"]:
        assert parse_message(text, PLAIN, final) == msg(None, text)


def test_reasoning_parser_without_tools_keeps_content_unchanged() -> None:
    assert parse_message("  hi  ", THINK, True) == msg(None, "  hi  ")
    assert parse_message("<think>r</think>  hi  ", THINK, True) == msg("r", "hi  ")
    assert parse_message("<think>r</think>   ", THINK, True) == msg("r", None)
    assert parse_message("<think>r</think>\n<tool_call>{}", THINK, True) == msg("r", "<tool_call>{}")


# Rule 3: tool calls.


def call(k: int, name: str, arguments: str) -> ToolCall:
    return ToolCall(f"c_{k}", name, arguments)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (CALL_F, msg(None, None, call(0, "f", F_ARGS))),
        (f"Let me check.\n{CALL_F}\n", msg(None, "Let me check.", call(0, "f", F_ARGS))),
        (f"{CALL_F}\nDone.", msg(None, "Done.", call(0, "f", F_ARGS))),
        (f"a {CALL_F} b {CALL_G} c", msg(None, "a  b  c", call(0, "f", F_ARGS), call(1, "g", "{}"))),
        (CALL_F + CALL_G, msg(None, None, call(0, "f", F_ARGS), call(1, "g", "{}"))),
        (
            '<tool_call>{"name": "h", "arguments": "{\\"x\\": 2}"}</tool_call>',
            msg(None, None, call(0, "h", '{"x": 2}')),
        ),
        (
            '<tool_call>{"name": "é", "arguments": {"q": "日本"}}</tool_call>',
            msg(None, None, call(0, "é", '{"q": "日本"}')),
        ),
        ("  just text  ", msg(None, "just text")),
        ("   ", msg(None, None)),
        ("", msg(None, None)),
    ],
)
def test_tool_calls(text: str, expected: ParsedMessage) -> None:
    assert parse_message(text, TOOLS, True) == expected


@pytest.mark.parametrize(
    "body",
    [
        '{"name": "f", "arguments": ',  # broken JSON
        '{"name": "f"}',  # no arguments
        '{"arguments": {}}',  # no name
        '{"name": 3, "arguments": {}}',
        '{"name": "", "arguments": {}}',
        '{"name": "f", "arguments": [1]}',
        '{"name": "f", "arguments": "not json"}',
        '{"name": "f", "arguments": "[1, 2]"}',
        '{"name": "f", "arguments": {"x": NaN}}',  # not JSON, though Python's decoder takes it
        '["f", {}]',
        "[" * 100_000,  # deeper than the decoder's recursion limit
    ],
)
def test_a_block_that_is_not_a_call_is_text(body: str) -> None:
    text = f"before <tool_call>{body}</tool_call> {CALL_G} after"
    expected = msg(None, f"before <tool_call>{body}</tool_call>  after", call(0, "g", "{}"))
    assert parse_message(text, TOOLS, True) == expected  # ids count parsed calls only


def test_the_first_close_tag_ends_a_block_even_inside_a_json_string() -> None:
    text = '<tool_call>{"name": "f", "arguments": {"s": "</tool_call>"}}</tool_call>'
    assert parse_message(text, TOOLS, True) == msg(None, text)


def test_an_unclosed_block_is_held_mid_stream_and_text_at_the_end() -> None:
    text = 'Sure. <tool_call>{"name": "f", "arguments": {}}'
    assert parse_message(text, TOOLS, False) == msg(None, "Sure.")
    assert parse_message(text, TOOLS, True) == msg(None, text)


@pytest.mark.parametrize(
    ("text", "settled"),
    [
        ("  hello  ", "hello"),  # no leading whitespace ever; trailing held until text follows
        ("hello <tool_", "hello"),
        ("hello <tool_call> {", "hello"),
        ("hello <tool_x", "hello <tool_x"),
        ("hello <", "hello"),
        (f"{CALL_F}  hi", "hi"),
    ],
)
def test_content_mid_stream(text: str, settled: str) -> None:
    assert parse_message(text, TOOLS, False).content == settled


def test_a_call_is_emitted_only_when_its_block_closes() -> None:
    assert parse_message(CALL_F[:-1], TOOLS, False).tool_calls == ()
    assert parse_message(CALL_F, TOOLS, False).tool_calls == (call(0, "f", F_ARGS),)


def test_reasoning_then_calls() -> None:
    text = f"<think>I should call f.</think>\n\n{CALL_F}"
    assert parse_message(text, THINK_TOOLS, True) == msg("I should call f.", None, call(0, "f", F_ARGS))
    # Calls inside reasoning are part of the reasoning.
    text = f"<think>maybe {CALL_G}</think>ok"
    assert parse_message(text, THINK_TOOLS, True) == msg(f"maybe {CALL_G}", "ok")
    assert parse_message("<tool_", THINK_TOOLS, False) == msg(None, None)
    assert parse_message("<tool_", THINK_TOOLS, True) == msg(None, "<tool_")


# Streaming.


def test_stream_deltas() -> None:
    stream = MessageStream(THINK_TOOLS)
    text = f"<think>hm</think> Sure: {CALL_F} "
    deltas = [stream.update(text[:end], final=False) for end in (3, 9, 20, 30, len(text) - 1)]
    deltas.append(stream.update(text, final=True))
    assert deltas[0].empty
    assert "".join(d.reasoning for d in deltas) == "hm"
    assert "".join(d.content for d in deltas) == "Sure:"
    assert [c for d in deltas for c in d.tool_calls] == [call(0, "f", F_ARGS)]
    assert stream.message == parse_message(text, THINK_TOOLS, True)
    with pytest.raises(RuntimeError):
        stream.update(text, final=True)


def test_a_delta_is_what_is_new() -> None:
    stream = MessageStream(TOOLS)
    assert stream.update("Hi <tool_c", final=False) == MessageDelta("", "Hi", ())
    assert stream.update("Hi <tool_cx", final=False) == MessageDelta("", " <tool_cx", ())


# The streaming property: any split of any text streams to exactly the whole-response message.

PIECES = [
    "hello",
    "wörld 🙂",
    " ",
    "\n",
    " \t\n",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    '{"name": "f", "arguments": {"a": [1, "x"]}}',
    '\n{"name": "g", "parameters": {}}\n',
    '{"name": "h", "arguments": "{\\"b\\": 2}"}',
    '{"name": "f", "arguments": ',
    '{"name": 1}',
    '"</tool_call>"}',
    CALL_F,
    "<thi",
    "</thi",
    "<tool_",
    "</tool_c",
    "<",
    ">",
    "{",
    "}",
]

texts = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=3)), max_size=12).map("".join)


def extends(old: ParsedMessage, new: ParsedMessage) -> bool:
    def grows(a: str | None, b: str | None) -> bool:
        return (a is None or b is not None) and (b or "").startswith(a or "")

    return (
        grows(old.reasoning, new.reasoning)
        and grows(old.content, new.content)
        and new.tool_calls[: len(old.tool_calls)] == old.tool_calls
    )


@settings(max_examples=200, deadline=None)
@given(text=texts, cuts=st.lists(st.integers(min_value=0), max_size=6))
def test_any_split_streams_to_the_whole_message(text: str, cuts: list[int]) -> None:
    ends = sorted({cut % (len(text) + 1) for cut in cuts})
    for syntax in ALL_SYNTAXES:
        whole = parse_message(text, syntax, final=True)
        # Every character prefix: each result extends the one before (so every split works).
        results = [parse_message(text[:end], syntax, final=False) for end in range(len(text) + 1)]
        results.append(whole)
        for old, new in itertools.pairwise(results):
            assert extends(old, new), (old, new)
        # One random split, through the stream.
        stream = MessageStream(syntax)
        deltas = [stream.update(text[:end], final=False) for end in ends]
        deltas.append(stream.update(text, final=True))
        assert "".join(d.reasoning for d in deltas) == (whole.reasoning or "")
        assert "".join(d.content for d in deltas) == (whole.content or "")
        assert tuple(c for d in deltas for c in d.tool_calls) == whole.tool_calls
        assert stream.message == whole
