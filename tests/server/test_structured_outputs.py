"""Structured outputs over HTTP, behind a real `hawker serve` (of a tiny random-weight model: whatever it
prefers, the constraint decides the shape): the official client's ``parse`` with a pydantic model, vLLM's
fields, streamed = whole, and every bad constraint a 400 that changes nothing."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pydantic
import pytest

from tests.server.conftest import COMPILE_TIMEOUT_S
from tests.support.server_process import ServerProcess


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    country: str = pydantic.Field(max_length=12)
    population_millions: int = pydantic.Field(ge=0, le=100)


@pytest.fixture
def server(structured_server: ServerProcess) -> ServerProcess:
    return structured_server


@pytest.fixture
def client(structured_client: openai.OpenAI) -> openai.OpenAI:
    return structured_client


# Integers in distinct ranges: llguidance builds a regex for each, seconds in all (far over the test
# server's limit), where the schemas of the other tests take milliseconds.
SLOW_SCHEMA = {
    "type": "object",
    "properties": {f"k{i}": {"type": "integer", "minimum": i * 13, "maximum": i * 1000 + 7} for i in range(6000)},
    "required": [f"k{i}" for i in range(6000)],
}


def ask(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def test_the_official_client_parses_a_pydantic_model(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model="m", messages=ask("Name a big city, as JSON."), response_format=City, max_tokens=180, seed=1
    )
    message = completion.choices[0].message
    assert isinstance(message.parsed, City), message.content
    assert completion.choices[0].finish_reason == "stop"


def test_json_schema_regex_choice_and_grammar_requests(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "answer": {"enum": ["yes", "no"]},
            "confidence": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["answer", "confidence"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}}
    reply = client.chat.completions.create(model="m", messages=ask("Is water wet?"), response_format=fmt, max_tokens=40)
    jsonschema.validate(json.loads(reply.choices[0].message.content or ""), schema)

    pattern = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    reply = client.completions.create(
        model="m", prompt="Today's date:", max_tokens=20, extra_body={"structured_outputs": {"regex": pattern}}
    )
    assert re.fullmatch(pattern, reply.choices[0].text), reply.choices[0].text

    reply = client.chat.completions.create(
        model="m", messages=ask("Pick a colour."), max_tokens=10, extra_body={"guided_choice": ["red", "green"]}
    )
    assert reply.choices[0].message.content in ("red", "green")

    grammar = 'start: "The answer is " NUMBER "."\nNUMBER: /[1-9][0-9]?/'
    reply = client.completions.create(
        model="m", prompt="What is 6 times 7?", max_tokens=20, extra_body={"guided_grammar": grammar}
    )
    assert re.fullmatch(r"The answer is [1-9][0-9]?\.", reply.choices[0].text), reply.choices[0].text


def test_a_streamed_constrained_reply_is_the_whole_one(client: openai.OpenAI) -> None:
    body = {"messages": ask("A city, as JSON."), "max_tokens": 180, "seed": 3, "temperature": 0.7}
    schema = City.model_json_schema() | {"additionalProperties": False}  # JSON Schema allows more keys by default
    body["response_format"] = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}
    whole = client.chat.completions.create(model="m", **body).choices[0].message.content
    chunks = client.chat.completions.create(model="m", stream=True, **body)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == whole
    City.model_validate_json(whole or "")


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
            "json",
        ),
        ({"structured_outputs": {"regex": "a("}}, "regex"),
        ({"guided_grammar": "start: missing"}, "grammar"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "one output constraint"),
        ({"response_format": {"type": "json_schema"}}, "json_schema"),
        ({"structured_outputs": {"choice": []}}, "choice"),
        ({"guided_choice": ["a"] * 1025}, "guided_choice"),
        ({"structured_outputs": {"regex": "a" * (1 << 20 | 1)}}, "at most"),
        ({"guided_json": {"type": "object", "if": {"required": ["a"]}, "then": {}}}, 'keyword(s) "if", "then"'),
        ({"guided_json": {"type": "string", "format": "iri"}}, "unsupported string format 'iri'"),
        ({"guided_json": SLOW_SCHEMA}, f"could not be compiled within {COMPILE_TIMEOUT_S:g} s"),
    ],
)
def test_a_bad_constraint_is_a_400_that_changes_nothing(server: ServerProcess, extra: dict, words: str) -> None:
    body = {"model": "m", "messages": ask("hi"), "max_tokens": 5, **extra}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"
    assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200
    assert server.metrics()["hawker:num_requests_running"] == 0
