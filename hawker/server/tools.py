"""OpenAI tools on the chat API: the definitions checked, what the chat template gets, and the grammar that
enforces ``tool_choice`` "required" or a named function.

Calls are written in the Hermes/Qwen format (``<tool_call>`` + a JSON object with ``name`` and
``arguments`` + ``</tool_call>``), the one ``hawker/loader/chat_templates.py`` teaches the default model
and ``message_parsing.py`` reads back. "required" and a named function are enforced by a grammar
(hawker/structured/): the output is one or more such blocks (one when ``parallel_tool_calls`` is false),
each naming an allowed function with arguments that match its parameter schema, so they always parse; a
named function is called once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from hawker.structured.params import JSON_LAYOUT, StructuredOutputsParams, closed_objects

TOOL_CALL_PARSERS = ("hermes",)
MAX_TOOLS = 128  # OpenAI's limit on tools in one request
# OpenAI: a function name is letters, digits, underscores and dashes, at most 64 of them.
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# A function without a parameter schema takes an object of anything.
_ANY_OBJECT: dict[str, Any] = {"type": "object"}

ToolMode = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: dict[str, Any]

    def template_entry(self) -> dict[str, Any]:
        """The tool as chat templates expect it (OpenAI's shape)."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}

    def call_schema(self) -> dict[str, Any]:
        """A call of this function: ``{"name": <its name>, "arguments": <its parameters>}`` (objects closed to
        unlisted keys, as in response formats: hawker/structured/params.py)."""
        return {
            "x-guidance": JSON_LAYOUT,
            "type": "object",
            "properties": {"name": {"const": self.name}, "arguments": closed_objects(self.parameters)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }


@dataclass(frozen=True)
class ToolPlan:
    """What a request's ``tools`` and ``tool_choice`` ask for, checked."""

    functions: tuple[Function, ...]
    mode: ToolMode
    named: str | None = None  # mode "named": the function that must be called
    parallel: bool = True

    @property
    def parses_calls(self) -> bool:
        """Whether the output is read for calls (not with no tools, or ``tool_choice`` "none")."""
        return bool(self.functions) and self.mode != "none"

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools the chat template lists (none for ``tool_choice`` "none", as vLLM does by default)."""
        return [f.template_entry() for f in self.functions] if self.parses_calls else None

    def parameter_constraints(self) -> list[tuple[str, StructuredOutputsParams]]:
        """(param path, constraint) of each function's parameter schema, to be compiled as a check."""
        return [
            (f"tools[{index}].function.parameters", StructuredOutputsParams(json=function.parameters))
            for index, function in enumerate(self.functions)
        ]

    def constraint(self) -> StructuredOutputsParams | None:
        """The grammar of "required" or a named function; None when the model may answer in text."""
        if self.mode == "required":
            return StructuredOutputsParams(grammar=_calls_grammar(self.functions, self.parallel))
        if self.mode == "named":
            # One call of that function (as OpenAI and vLLM answer a named choice).
            chosen = tuple(f for f in self.functions if f.name == self.named)
            return StructuredOutputsParams(grammar=_calls_grammar(chosen, parallel=False))
        return None


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice: Any, parallel_tool_calls: bool | None) -> ToolPlan:
    """Check a request's ``tools`` and ``tool_choice`` (``ValueError`` naming the field) into a ToolPlan."""
    functions = _functions(tools or [])
    mode, named = _choice(tool_choice, functions)
    return ToolPlan(functions, mode, named, parallel=parallel_tool_calls is not False)


def _functions(tools: list[dict[str, Any]]) -> tuple[Function, ...]:
    if len(tools) > MAX_TOOLS:
        raise ValueError(f"tools: at most {MAX_TOOLS} tools, got {len(tools)}")
    functions = tuple(_function(index, tool) for index, tool in enumerate(tools))
    names = [f.name for f in functions]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"tools: function names must be unique; {', '.join(map(repr, duplicates))} repeats")
    return functions


def _function(index: int, tool: dict[str, Any]) -> Function:
    where = f"tools[{index}]"
    if tool.get("type", "function") != "function":
        raise ValueError(f"{where}.type must be 'function', got {tool.get('type')!r}")
    spec = tool.get("function")
    if not isinstance(spec, dict):
        raise ValueError(f"{where}.function must be an object with a name")
    name = spec.get("name")
    if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
        raise ValueError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}")
    description = spec.get("description")
    if description is not None and not isinstance(description, str):
        raise ValueError(f"{where}.function.description must be a string")
    parameters = spec.get("parameters", _ANY_OBJECT)
    if parameters is None:
        parameters = _ANY_OBJECT
    if not isinstance(parameters, dict):
        raise ValueError(f"{where}.function.parameters must be a JSON schema object")
    if parameters.get("type", "object") != "object":
        raise ValueError(f"{where}.function.parameters must describe an object (type 'object')")
    return Function(name, description, parameters)


def _choice(tool_choice: Any, functions: tuple[Function, ...]) -> tuple[ToolMode, str | None]:
    if tool_choice is None:
        return ("auto" if functions else "none"), None
    if tool_choice in ("none", "auto", "required"):
        if tool_choice != "none" and not functions:
            raise ValueError(f"tool_choice {tool_choice!r} needs tools")
        return tool_choice, None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        spec = tool_choice.get("function")
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str):
            raise ValueError("tool_choice.function.name must name one of the tools")
        if name not in {f.name for f in functions}:
            known = ", ".join(repr(f.name) for f in functions) or "none"
            raise ValueError(f"tool_choice names the function {name!r}, which is not in tools (there: {known})")
        return "named", name
    raise ValueError(
        "tool_choice must be 'none', 'auto', 'required' or "
        '{"type": "function", "function": {"name": ...}}, got ' + json.dumps(tool_choice)[:200]
    )


def _calls_grammar(functions: tuple[Function, ...], parallel: bool) -> str:
    """Lark (llguidance's dialect): one call block, or several separated by a newline."""
    try:
        rules = [f"fn_{index}: %json {json.dumps(f.call_schema())}" for index, f in enumerate(functions)]
    except RecursionError:
        raise ValueError("tools: a parameter schema is nested too deeply") from None
    alternatives = " | ".join(f"fn_{index}" for index in range(len(functions)))
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    return "\n".join(
        [
            "%llguidance {}",
            start,
            'call: "<tool_call>\\n" body "\\n</tool_call>"',
            f"body: {alternatives}",
            *rules,
        ]
    )
