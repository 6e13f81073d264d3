"""What a request's output must match (vLLM's ``StructuredOutputsParams``), checked at construction."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# The kinds of constraint, as llguidance's grammar_from names their formats.
KINDS = ("json", "json_object", "regex", "choice", "grammar")
# JSON is generated with fixed whitespace, as json.dumps writes it (", " and ": ", no newlines): with
# free whitespace a small model can spend its whole budget on blank lines and never close the object.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_CONSTRAINT_CHARS = 1 << 20  # a schema, regex or grammar longer than this is a mistake
MAX_CHOICES = 1024


@dataclass(frozen=True, init=False)
class StructuredOutputsParams:
    """Exactly one of: ``json`` (a JSON schema, as a dict or its text), ``json_object`` (any JSON object),
    ``regex``, ``choice`` (one of these strings) or ``grammar`` (Lark, or llama.cpp's GBNF)."""

    json: str | None  # the schema as JSON text (keys in the given order, which the output follows): hashable
    json_object: bool
    regex: str | None
    choice: tuple[str, ...] | None
    grammar: str | None

    def __init__(
        self,
        json: dict[str, Any] | str | None = None,
        json_object: bool = False,
        regex: str | None = None,
        choice: list[str] | tuple[str, ...] | None = None,
        grammar: str | None = None,
    ) -> None:
        object.__setattr__(self, "json", _schema_text(json))
        object.__setattr__(self, "json_object", bool(json_object))
        object.__setattr__(self, "regex", _text("regex", regex))
        object.__setattr__(self, "choice", _choices(choice))
        object.__setattr__(self, "grammar", _text("grammar", grammar))
        given = [kind for kind in KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            found = ", ".join(given) or "none"
            raise ValueError(f"structured_outputs needs exactly one of {', '.join(KINDS)}; got {found}")

    @property
    def kind(self) -> str:
        return next(kind for kind in KINDS if getattr(self, kind) not in (None, False))

    def grammar_source(self) -> tuple[str, str]:
        """(llguidance format, text) of this constraint."""
        if self.json is not None:
            return "json_schema", _with_layout(closed_objects(json.loads(self.json)))
        if self.json_object:
            return "json_schema", _with_layout({"type": "object"})
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json.dumps(list(self.choice))
        assert self.grammar is not None
        return "grammar", self.grammar


def _schema_text(schema: dict[str, Any] | str | None) -> str | None:
    if schema is None:
        return None
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as error:
            raise ValueError(f"structured_outputs.json is not valid JSON: {error}") from error
    if not isinstance(schema, dict):
        raise ValueError(f"structured_outputs.json must be a JSON schema object, got {type(schema).__name__}")
    try:
        text = json.dumps(schema)
    except RecursionError:
        raise ValueError("structured_outputs.json is nested too deeply") from None
    if len(text) > MAX_CONSTRAINT_CHARS:
        raise ValueError(f"structured_outputs.json is {len(text)} characters; at most {MAX_CONSTRAINT_CHARS}")
    return text


def closed_objects(schema: Any) -> Any:
    """``schema`` with ``"additionalProperties": false`` on every object that lists its properties and says
    nothing about others.

    The JSON schema default allows any other key, and a small model given that freedom adds invented keys
    until its token budget runs out (so its JSON never closes). xgrammar, vLLM's default backend, reads
    schemas the same way (its strict mode), as OpenAI's strict mode requires; vLLM offers it for
    llguidance as ``disable_additional_properties``. Members of ``allOf`` are left open: each lists only
    part of the properties, and closing one would forbid the others'.
    """
    try:
        return _closed(schema)
    except RecursionError:
        raise ValueError("the JSON schema is nested too deeply") from None


def _closed(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: value if key in _LITERAL_KEYS else _close_child(key, value) for key, value in schema.items()}
    open_keys = ("additionalProperties", "patternProperties", "unevaluatedProperties")
    if isinstance(schema.get("properties"), dict) and not any(key in schema for key in open_keys):
        closed["additionalProperties"] = False
    return closed


# Keywords whose values are data, not schemas: never rewritten.
_LITERAL_KEYS = frozenset({"enum", "const", "default", "examples", "required", "x-guidance"})


def _close_child(key: str, value: Any) -> Any:
    if key == "allOf" and isinstance(value, list):
        return [{k: _closed(v) if k != "properties" else _close_map(v) for k, v in m.items()} for m in value]
    if key in ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas"):
        return _close_map(value)
    return _closed(value)


def _close_map(value: Any) -> Any:
    """A map of name -> schema: each schema closed (the names themselves are data)."""
    if not isinstance(value, dict):
        return value
    return {name: _closed(schema) for name, schema in value.items()}


def _with_layout(schema: dict[str, Any]) -> str:
    """The schema with llguidance's layout options (whitespace, separators), unless it sets its own."""
    return json.dumps({"x-guidance": JSON_LAYOUT, **schema})


def _text(name: str, value: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"structured_outputs.{name} must be a non-empty string")
    if len(value) > MAX_CONSTRAINT_CHARS:
        raise ValueError(f"structured_outputs.{name} is {len(value)} characters; at most {MAX_CONSTRAINT_CHARS}")
    return value


def _choices(value: list[str] | tuple[str, ...] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(c, str) and c for c in value) or not value:
        raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
    if len(value) > MAX_CHOICES:
        raise ValueError(f"structured_outputs.choice has {len(value)} strings; at most {MAX_CHOICES}")
    return tuple(value)


def as_structured_outputs(value: Any) -> StructuredOutputsParams | None:
    """``value`` as StructuredOutputsParams: one already, a dict of its fields, or None."""
    if value is None or isinstance(value, StructuredOutputsParams):
        return value
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown structured_outputs field(s): {', '.join(unknown)}; allowed: {', '.join(KINDS)}")
        return StructuredOutputsParams(**value)
    raise ValueError(f"structured_outputs must be StructuredOutputsParams or a dict, got {type(value).__name__}")
