"""Request bodies of the OpenAI-compatible API (pydantic), and their SamplingParams.

Field *types* and *sizes* are checked here (a wrong type, a non-finite number
or a list over its bound is a 400 naming the field, before anything is built
from the request); value *ranges* are checked once, by ``SamplingParams``
(same messages as the offline API). Every list is validated ``fail_fast``: a
list of a million bad items stops at the first, instead of building a million
error records. Unknown fields are accepted and ignored, as vLLM does, so that
clients sending newer OpenAI fields keep working; the server logs them.
"""

from __future__ import annotations

import contextlib
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from hawker.sampling_params import (
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_LOGPROBS,
    MAX_SEQUENCE_TOKENS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    SamplingParams,
)
from hawker.server.tools import MAX_TOOLS, ToolPlan, plan_tools
from hawker.structured.params import MAX_CHOICES

# Sizes only the HTTP API has (SamplingParams holds the rest, shared with the offline API).
MAX_PROMPTS = 2048  # prompts in one completions request: OpenAI's limit on input arrays
MAX_MESSAGES = 2048  # OpenAI: messages holds at most 2048 entries
MAX_CONTENT_PARTS = 2048  # parts of one message's content (as many as messages)
MAX_NAME_CHARS = 256  # model, user and message name: identifiers, never text
MAX_BEST_OF = 20  # OpenAI: best_of at most 20; each candidate is a sequence that runs to the end
MAX_TOOL_CALLS = 128  # calls in one assistant message of the history
# A prompt text longer than max_model_len times this many characters cannot fit
# the context (common BPE vocabularies' longest tokens are runs of up to ~128 of
# one character), so it is refused before the tokenizer spends seconds on it.
MAX_CHARS_PER_TOKEN = 128
# The max_tokens of a request that sets none (a server option). Without it, a chat
# request may generate up to the whole context (8k tokens for the default model:
# minutes of a CPU server's time); 1024 tokens is a long answer, and tens of
# seconds of decoding on a CPU.
DEFAULT_MAX_TOKENS = 1024

# JSON "Infinity", "-Infinity" and "NaN" (which Python's json reads) are refused
# in every float field, and so is a number too large for a float (1e400).
_CONFIG = ConfigDict(extra="allow", allow_inf_nan=False)


def _bounded(limit: int, what: str) -> BeforeValidator:
    """Refuse a list longer than ``limit`` before its items are validated (an item-by-item union would not)."""

    def check(value: Any) -> Any:
        if isinstance(value, list) and len(value) > limit:
            raise ValueError(f"may hold at most {limit} {what}, got {len(value)}")
        return value

    return BeforeValidator(check)


def _check_prompt(value: Any) -> Any:
    """A prompt list: at most MAX_PROMPTS prompts, or one prompt of at most MAX_SEQUENCE_TOKENS token ids."""
    if not isinstance(value, list):
        return value
    is_ids = bool(value) and isinstance(value[0], int)
    limit, what = (MAX_SEQUENCE_TOKENS, "token ids") if is_ids else (MAX_PROMPTS, "prompts")
    if len(value) > limit:
        raise ValueError(f"may hold at most {limit} {what}, got {len(value)}")
    for item in value:
        if isinstance(item, list) and len(item) > MAX_SEQUENCE_TOKENS:
            raise ValueError(f"prompts may hold at most {MAX_SEQUENCE_TOKENS} token ids each, got {len(item)}")
    return value


def _check_stop(value: Any) -> Any:
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    if len(items) > MAX_STOP_STRINGS:
        raise ValueError(f"may hold at most {MAX_STOP_STRINGS} strings, got {len(items)}")
    longest = max((len(item) for item in items if isinstance(item, str)), default=0)
    if longest > MAX_STOP_CHARS:
        raise ValueError(f"strings must be at most {MAX_STOP_CHARS} characters, got {longest}")
    return value


Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]
TokenIds = Annotated[list[int], Field(max_length=MAX_SEQUENCE_TOKENS, fail_fast=True)]
Prompt = Annotated[
    str
    | Annotated[list[str], Field(max_length=MAX_PROMPTS, fail_fast=True)]
    | TokenIds
    | Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS, fail_fast=True)],
    BeforeValidator(_check_prompt),
]
Stop = Annotated[
    str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS, fail_fast=True)] | None,
    BeforeValidator(_check_stop),
]


def check_text_fits(text: str, max_model_len: int, param: str) -> None:
    """Raise ``ValueError`` for a text too long to fit ``max_model_len`` tokens, before it is tokenized."""
    limit = max_model_len * MAX_CHARS_PER_TOKEN
    if len(text) > limit:
        raise ValueError(
            f"{param} has {len(text)} characters: more than max_model_len ({max_model_len}) tokens "
            f"can hold ({limit} characters at most)"
        )


class StreamOptions(BaseModel):
    model_config = _CONFIG

    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """OpenAI's ``response_format.json_schema``: a named schema (``strict`` is how Hawker always works)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, populate_by_name=True)

    name: Name | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = _CONFIG

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = _CONFIG

    model: Name | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: Stop = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: Annotated[dict[str, float], Field(max_length=MAX_LOGIT_BIAS_ENTRIES, fail_fast=True)] | None = None
    user: Name | None = None
    # vLLM's extras.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[int], Field(max_length=MAX_STOP_TOKEN_IDS, fail_fast=True)] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields.
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(max_length=MAX_CHOICES, fail_fast=True)] | None = None
    guided_grammar: str | None = None

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})

    def _structured_outputs(self) -> dict[str, Any] | None:
        """The one constraint the request asks for, in ``StructuredOutputsParams``' fields (None: none)."""
        found: dict[str, dict[str, Any]] = {}
        if self.response_format is not None and self.response_format.type != "text":
            found["response_format"] = _response_format_constraint(self.response_format)
        if self.structured_outputs is not None:
            found["structured_outputs"] = self.structured_outputs
        guided = {"json": self.guided_json, "regex": self.guided_regex, "choice": self.guided_choice}
        guided["grammar"] = self.guided_grammar
        for kind, value in guided.items():
            if value is not None:
                found[f"guided_{kind}"] = {kind: value}
        if len(found) > 1:
            raise ValueError(f"give one output constraint, not {' and '.join(sorted(found))}")
        return next(iter(found.values()), None)

    def _sampling_kwargs(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None) -> dict:
        given = {
            "n": self.n,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "seed": self.seed,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "min_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos,
            "skip_special_tokens": self.skip_special_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "logit_bias": _bias(self.logit_bias),
            "logprobs": logprobs,
            "prompt_logprobs": prompt_logprobs,
            "structured_outputs": self._structured_outputs(),
        }
        # None means "the default" (JSON null is how clients leave a field unset).
        kwargs: dict[str, Any] = {name: value for name, value in given.items() if value is not None}
        kwargs["max_tokens"] = max_tokens
        return kwargs


def _response_format_constraint(response_format: ResponseFormat) -> dict[str, Any]:
    if response_format.type == "json_object":
        return {"json_object": True}
    spec = response_format.json_schema
    if spec is None or spec.json_schema is None:
        raise ValueError("response_format of type json_schema needs json_schema.schema")
    return {"json": spec.json_schema}


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    # Candidates per prompt, of which the n best (highest mean token logprob) are returned.
    best_of: int | None = None

    @property
    def num_candidates(self) -> int:
        """Sequences run per prompt: ``best_of`` when it asks for more than ``n``, else ``n``."""
        return self.best_of if self.best_of is not None and self.best_of > self.n else self.n

    def sampling_params(self) -> SamplingParams:
        self._check_best_of()
        # echo + logprobs reports the prompt tokens' logprobs too.
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        logprobs = self.logprobs
        if self.num_candidates > self.n and logprobs is None:
            logprobs = 0  # candidates are ranked by their tokens' logprobs; the response leaves them out
        kwargs = self._sampling_kwargs(self.max_tokens, logprobs, prompt_logprobs)
        return SamplingParams(**(kwargs | {"n": self.num_candidates}))

    def _check_best_of(self) -> None:
        best_of = self.best_of
        if best_of is None or best_of == self.n:
            return
        if best_of < self.n:
            raise ValueError(f"best_of must be >= n ({self.n}), got {best_of}")
        if best_of > MAX_BEST_OF:
            raise ValueError(f"best_of must be at most {MAX_BEST_OF} when it exceeds n, got {best_of}")
        if self.stream:
            raise ValueError("best_of greater than n cannot be streamed (the best are known only at the end)")

    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


class TextPart(BaseModel):
    model_config = _CONFIG

    type: Literal["text"]
    text: str


Content = Annotated[
    str | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS, fail_fast=True)] | None,
    _bounded(MAX_CONTENT_PARTS, "parts"),
]


class HistoryFunction(BaseModel):
    model_config = _CONFIG

    name: Name
    arguments: str | dict[str, Any] = "{}"


class HistoryToolCall(BaseModel):
    """A call an assistant made earlier in the conversation."""

    model_config = _CONFIG

    id: Name | None = None
    type: Literal["function"] = "function"
    function: HistoryFunction

    def as_template_call(self) -> dict[str, Any]:
        # Templates write arguments as JSON themselves (tojson): give them the object, not its text.
        arguments: Any = self.function.arguments
        if isinstance(arguments, str):
            with contextlib.suppress(json.JSONDecodeError):  # not JSON: the template gets the text as it came
                arguments = json.loads(arguments)
        call = {"type": "function", "function": {"name": self.function.name, "arguments": arguments}}
        return call if self.id is None else {"id": self.id, **call}


class ChatMessage(BaseModel):
    model_config = _CONFIG

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content = None
    name: Name | None = None
    # An assistant turn's calls (OpenAI's shape), and which call a tool message answers.
    tool_calls: Annotated[list[HistoryToolCall], Field(max_length=MAX_TOOL_CALLS, fail_fast=True)] | None = None
    tool_call_id: Name | None = None

    def as_template_message(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [call.as_template_call() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


Messages = Annotated[
    list[ChatMessage], Field(max_length=MAX_MESSAGES, fail_fast=True), _bounded(MAX_MESSAGES, "messages")
]


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[Messages, Field(min_length=1)]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: Annotated[list[dict[str, Any]], Field(max_length=MAX_TOOLS, fail_fast=True)] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def tool_plan(self) -> ToolPlan:
        return plan_tools(self.tools, self.tool_choice, self.parallel_tool_calls)

    def sampling_params(self, tools: ToolPlan | None = None) -> SamplingParams:
        """``tools``: the request's checked tool plan, when the caller made it already."""
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if self.max_completion_tokens is not None and not 1 <= self.max_completion_tokens <= MAX_SEQUENCE_TOKENS:
            message = f"must be >= 1 and <= {MAX_SEQUENCE_TOKENS}, got {self.max_completion_tokens}"
            raise ValueError(f"max_completion_tokens {message}")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        kwargs = self._sampling_kwargs(max_tokens, logprobs, None)
        tool_constraint = (tools or self.tool_plan()).constraint()
        if tool_constraint is not None:
            if "structured_outputs" in kwargs:
                raise ValueError("tool_choice 'required' or a named function cannot be combined with an output format")
            kwargs["structured_outputs"] = tool_constraint
        return SamplingParams(**kwargs)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    model: Name | None = None
    prompt: str | None = None
    messages: Messages | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    model: Name | None = None
    tokens: TokenIds


def _bias(logit_bias: dict[str, float] | None) -> dict[int, float] | None:
    if not logit_bias:
        return None
    try:
        return {int(token): bias for token, bias in logit_bias.items()}
    except ValueError:
        raise ValueError("logit_bias keys must be token ids (integers as strings)") from None
