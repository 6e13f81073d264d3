"""Hawker's ChatML tool template: it shows the tools, and the calls it writes for an assistant turn are the
ones the Hermes parser reads back; which template a request with tools gets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hawker import LLM, SamplingParams
from hawker.loader.chat_templates import CHATML_TOOLS, read_chat_template, tools_template
from hawker.loader.tokenizer import load_tokenizer, render_chat
from hawker.server.message_parsing import MessageSyntax, parse_message
from tests.support.tiny_models import build_tiny_checkpoint

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "A city's weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALLS = [
    {"id": "c0", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}},
    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lyon"}}},
]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Zürich and Lyon?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": CALLS},
    {"role": "tool", "tool_call_id": "c0", "content": "sunny"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoints: dict[str, Path]):  # type: ignore[no-untyped-def]
    return load_tokenizer(tiny_checkpoints["llama"])


def test_the_tools_template_shows_tools_and_writes_calls_the_parser_reads_back(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = render_chat(tokenizer, CONVERSATION, True, CHATML_TOOLS, [TOOL])
    assert text.startswith("<|im_start|>system\nBe brief.\n\n") and json.dumps(TOOL, ensure_ascii=False) in text
    assert "<tool_response>\nsunny\n</tool_response>" in text and text.endswith("<|im_start|>assistant\n")
    turn = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    parsed = parse_message(turn, MessageSyntax(False, False, True, "call"), final=True)
    assert parsed.content == "Checking."
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        (call["function"]["name"], call["function"]["arguments"]) for call in CALLS
    ]
    # Without tools it is plain ChatML.
    plain = render_chat(tokenizer, CONVERSATION[1:2], True, CHATML_TOOLS)
    assert plain == "<|im_start|>user\nWeather in Zürich and Lyon?<|im_end|>\n<|im_start|>assistant\n"


def test_which_template_a_request_with_tools_gets(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert tools_template(tokenizer, None) is None  # the tiny model's own: neither tools nor ChatML
    assert tools_template(tokenizer, "{{ tools }}") == "{{ tools }}"
    tokenizer.chat_template = "<|im_start|>{{ messages }}"
    assert tools_template(tokenizer, None) == CHATML_TOOLS
    tokenizer.chat_template = "{% if tools %}{{ tools }}{% endif %}<|im_start|>"
    assert tools_template(tokenizer, None) == tokenizer.chat_template
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    assert read_chat_template(str(tmp_path / "t.jinja")) == "{{ messages }}"
    with pytest.raises(ValueError, match="neither a file"):
        read_chat_template(str(tmp_path / "missing.jinja"))


def test_offline_chat_shows_tools(tmp_path: Path) -> None:
    # The tiny tokenizer spends about a token per character: the tool prompt needs a longer context.
    checkpoint = build_tiny_checkpoint("llama", tmp_path / "llama", max_positions=1024)
    llm = LLM(str(checkpoint), dtype="float32", compile_decode_max_rows=0, kv_cache_memory_gb=0.05)
    params = SamplingParams(max_tokens=2)
    with pytest.raises(ValueError, match="cannot show tools"):
        llm.chat(CONVERSATION[:2], params, use_tqdm=False, tools=[TOOL])
    out = llm.chat(CONVERSATION[:2], params, use_tqdm=False, tools=[TOOL], chat_template=CHATML_TOOLS)[0]
    assert "get_weather" in (out.prompt or "")
