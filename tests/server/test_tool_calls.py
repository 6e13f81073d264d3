"""Tool calling over HTTP, behind a real `hawker serve` of a tiny random-weight model (tests/server/conftest.py):
"required" and named choices always give calls that parse and match their function's schema (the grammar
enforces them), "auto" gives text or parsed calls, streamed deltas reassemble to exactly the whole message,
bad tool definitions are 400s that change nothing, and /metrics counts the constrained work."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.support.server_process import ServerProcess

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer"}},
    "required": ["a", "b"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "A city's weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED_ADD = {"type": "function", "function": {"name": "add"}}


def check_calls(calls: list[Any] | None, allowed: set[str]) -> None:
    """Every call names an allowed function, and its arguments parse and match that function's schema."""
    assert calls, "no tool calls"
    for call in calls:
        assert call.type == "function" and call.id
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("seed", range(4))
def test_required_and_named_choices_always_give_valid_calls(structured_client: openai.OpenAI, seed: int) -> None:
    common: dict[str, Any] = {"model": "m", "messages": ASK, "tools": TOOLS, "max_tokens": 300}
    common |= {"temperature": 1.0, "seed": seed}
    required = structured_client.chat.completions.create(tool_choice="required", **common).choices[0]
    check_calls(required.message.tool_calls, {"get_weather", "add"})
    if required.finish_reason == "tool_calls":
        assert required.message.content is None
    else:  # the budget ran out in a further call (the random model may chain several); it stays text
        assert required.finish_reason == "length"
    named = structured_client.chat.completions.create(tool_choice=NAMED_ADD, **common).choices[0]
    check_calls(named.message.tool_calls, {"add"})
    assert len(named.message.tool_calls or []) == 1 and named.finish_reason == "tool_calls"
    single = structured_client.chat.completions.create(tool_choice="required", parallel_tool_calls=False, **common)
    assert len(single.choices[0].message.tool_calls or []) == 1


def test_auto_gives_text_or_parsed_calls(structured_client: openai.OpenAI) -> None:
    for seed in range(3):
        reply = structured_client.chat.completions.create(
            model="m", messages=ASK, tools=TOOLS, max_tokens=30, temperature=1.0, seed=seed
        )
        message = reply.choices[0].message
        assert message.tool_calls or isinstance(message.content, str)
    # A reply that holds a call block (here forced by a grammar, as a model would write it) is read into
    # tool_calls, with the text around it as the content.
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    grammar = f"start: {json.dumps('Sure. ' + call)}"
    reply = structured_client.chat.completions.create(
        model="m", messages=ASK, tools=TOOLS, max_tokens=150, extra_body={"guided_grammar": grammar}
    )
    choice = reply.choices[0]
    assert choice.message.content == "Sure."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []] == [
        ("add", {"a": 1, "b": 2})
    ]
    assert choice.finish_reason == "tool_calls"
    # tool_choice "none": the tools are not shown, and nothing is read as a call.
    reply = structured_client.chat.completions.create(
        model="m", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=150, extra_body={"guided_grammar": grammar}
    )
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].message.content == "Sure. " + call


def reassemble(chunks: openai.Stream) -> dict[str, Any]:
    """A streamed reply as one message, put together the way OpenAI's clients do."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for piece in choice.delta.tool_calls or []:
            call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
            call["id"] = piece.id or call["id"]
            call["name"] += (piece.function and piece.function.name) or ""
            call["arguments"] += (piece.function and piece.function.arguments) or ""
        finish = choice.finish_reason or finish
    return {"content": content or None, "calls": [calls[i] for i in sorted(calls)], "finish": finish}


def test_streamed_tool_calls_reassemble_to_the_whole_message(structured_client: openai.OpenAI) -> None:
    choices: list[Any] = ["required", NAMED_ADD, "auto", "required"]
    for seed in range(20):
        body: dict[str, Any] = {"model": "m", "messages": ASK, "tools": TOOLS, "max_tokens": 120}
        body |= {"temperature": 0.9, "seed": seed, "tool_choice": choices[seed % len(choices)]}
        whole = structured_client.chat.completions.create(**body).choices[0]
        streamed = reassemble(structured_client.chat.completions.create(stream=True, **body))
        calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in whole.message.tool_calls or []]
        assert streamed["content"] == whole.message.content, seed
        assert [{"name": c["name"], "arguments": c["arguments"]} for c in streamed["calls"]] == calls, seed
        assert all(c["id"] for c in streamed["calls"])
        assert streamed["finish"] == whole.finish_reason, seed


def tool(parameters: Any, name: str = "f") -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"tools": [tool({"type": "object", "properties": {"a": {"type": "strin"}}})]}, "tools[0].function"),
        ({"tools": [tool({"type": "object", "not": {}})]}, 'keyword(s) "not"'),
        ({"tools": [tool([1])]}, "parameters must be a JSON schema object"),
        ({"tools": [tool(None, name="no spaces")]}, "function.name"),
        ({"tools": [tool(None), tool(None)]}, "unique"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice must be"),
        ({"tool_choice": "required"}, "needs tools"),
        ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "cannot be combined"),
        ({"tools": [tool(None, name=f"f{i}") for i in range(129)]}, "at most 128"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}] * 129}]},
            "at most 128",
        ),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "i" * 257}]}, "at most 256"),
    ],
)
def test_a_bad_tool_request_is_a_400_that_changes_nothing(
    structured_server: ServerProcess, extra: dict[str, Any], words: str
) -> None:
    body = {"model": "m", "messages": ASK, "max_tokens": 5, **extra}
    response = httpx.post(f"{structured_server.base_url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error", error
    assert httpx.get(f"{structured_server.base_url}/health", timeout=5).status_code == 200
    assert structured_server.metrics()["hawker:num_requests_running"] == 0


def test_metrics_count_constrained_requests_compiles_hits_and_mask_time(
    structured_server: ServerProcess, structured_client: openai.OpenAI
) -> None:
    before = structured_server.metrics()
    regex = r"[a-z]{3,9}\."  # two requests: one compile, then a cache hit
    for _ in range(2):
        structured_client.completions.create(
            model="m", prompt="A word:", max_tokens=12, extra_body={"guided_regex": regex}
        )
    after = structured_server.metrics()

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert grew("hawker:structured_requests_total") == 2
    assert grew("hawker:grammar_compiles_total") == 1
    assert grew("hawker:grammar_cache_hits_total") == 1
    assert grew("hawker:grammar_masked_steps_total") >= 2
    assert grew("hawker:grammar_mask_seconds_total") > 0
    assert after["hawker:grammar_compile_seconds_total"] > 0
