"""Tool calling on a running `hawker serve` (the default model): how often each tool_choice gives calls that
parse and match their function's schema, and whether streamed replies reassemble to the whole message.

Each try is one chat request (sampled, temperature 0.7, its own seed) asking for something one of the
tools does. ``required`` and a named function must give valid calls every time (a grammar enforces them);
``auto`` may answer in text or call.

Usage: start ``.venv/bin/hawker serve`` then ``.venv/bin/python benchmarks/tool_calls.py [--tries 20]``
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import jsonschema
import openai

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 40},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                    "b": {"type": "integer", "minimum": -1000, "maximum": 1000},
                },
                "required": ["a", "b"],
            },
        },
    },
]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
QUESTIONS = ["What is the weather like in Paris?", "What is 12 plus 30?", "Is it raining in Tokyo?", "Add 7 and 5."]
CHOICES: dict[str, Any] = {
    "required": "required",
    "named": {"type": "function", "function": {"name": "get_weather"}},
    "auto": "auto",
}


def valid_calls(calls: list[Any] | None) -> bool:
    if not calls:
        return False
    for call in calls:
        try:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        except (KeyError, json.JSONDecodeError, jsonschema.ValidationError):
            return False
    return True


def streamed_message(chunks: openai.Stream) -> tuple[str | None, list[tuple[str, str]]]:
    content, calls = "", {}
    for chunk in chunks:
        for piece in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            name, arguments = calls.get(piece.index, ("", ""))
            calls[piece.index] = (name + (piece.function.name or ""), arguments + (piece.function.arguments or ""))
        content += (chunk.choices[0].delta.content or "") if chunk.choices else ""
    return content or None, [calls[i] for i in sorted(calls)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--tries", type=int, default=20)
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused")
    model = client.models.list().data[0].id
    for label, choice in CHOICES.items():
        valid = texts = same = 0
        for seed in range(args.tries):
            body: dict[str, Any] = {
                "model": model,
                "messages": [{"role": "user", "content": QUESTIONS[seed % len(QUESTIONS)]}],
                "tools": TOOLS,
                "tool_choice": choice,
                "max_tokens": 200,
                "temperature": 0.7,
                "seed": seed,
            }
            message = client.chat.completions.create(**body).choices[0].message
            valid += valid_calls(message.tool_calls)
            texts += not message.tool_calls and isinstance(message.content, str)
            whole_calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
            same += streamed_message(client.chat.completions.create(stream=True, **body)) == (
                message.content,
                whole_calls,
            )
        tries = args.tries
        print(f"{label:9s}: {valid}/{tries} valid calls, {texts} text replies, {same}/{tries} streamed = whole")


if __name__ == "__main__":
    main()
