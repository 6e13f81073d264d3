"""SamplingParams: what a request asks of the sampler, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from hawker.structured.params import StructuredOutputsParams, as_structured_outputs

_GREEDY_EPS = 1e-5
LOGPROBS_MODES = ("processed", "raw")

# What one request may ask for. The HTTP request models (hawker/server/protocol.py)
# declare the same bounds, so that the server refuses a request before it builds
# anything from it; the offline API gets them from here. OpenAI's API reference
# is the source wherever it states a limit.
MAX_N = 128  # OpenAI: n in [1, 128]. Each sample is a sequence with its own KV blocks.
MAX_TEMPERATURE = 2.0  # OpenAI: temperature in [0, 2]
MAX_ABS_PENALTY = 2.0  # OpenAI: presence_penalty and frequency_penalty in [-2, 2]
# HF/vLLM only ask > 0; a factor above 2 divides every seen token's logit by
# more than 2, which no decoding recipe uses (1.0-1.3 is the usual range).
MAX_REPETITION_PENALTY = 2.0
MAX_LOGPROBS = 20  # OpenAI: top_logprobs in [0, 20]; vLLM's default max_logprobs (completions too)
MAX_LOGIT_BIAS = 100.0  # OpenAI: each bias in [-100, 100]
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI refuses more than 300 logit_bias entries
# OpenAI allows 4 stop sequences; code evals send more (HumanEval's five plus an
# end-of-text), and vLLM has no limit, so Hawker allows 32 of up to 1024 characters
# (a stop string is searched for in the text after every token).
MAX_STOP_STRINGS = 32
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024  # vLLM has no limit; a stop list longer than this is a mistake
# No checkpoint Hawker serves has a longer context: a bound on max_tokens,
# min_tokens and token-id lists before the engine checks the model's real limit.
MAX_SEQUENCE_TOKENS = 1 << 20
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # OpenAI's seed is an int64, as is torch's
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


@dataclass(frozen=True, init=False)
class SamplingParams:
    """Mirrors vLLM's ``SamplingParams``; every bad value raises ``ValueError``."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    # Which distribution ``logprobs`` come from: "processed", the one the token
    # was sampled from (after penalties, logit bias, temperature, top-k/top-p/
    # min-p; for greedy requests, before temperature), or "raw", the model's
    # own log-softmax (temperature 1, nothing truncated), what a trainer recomputes.
    logprobs_mode: str = "processed"
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # (token id, bias) pairs added to the logits before sampling (OpenAI's logit_bias).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # What the output must match: a JSON schema, any JSON object, a regex, a choice
    # of strings or a grammar (hawker/structured/); a dict of its fields is taken too.
    structured_outputs: StructuredOutputsParams | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __init__(self, **kwargs: Any) -> None:
        known = {f.name: f for f in fields(self) if f.name != "extra"}
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}; allowed: {', '.join(known)}")
        for name, f in known.items():
            value = kwargs.get(name, f.default)
            if name == "stop":
                value = _as_str_tuple(value)
            elif name == "stop_token_ids":
                value = tuple(int(t) for t in (value or ()))
            elif name == "logit_bias":
                value = _as_bias_pairs(value)
            elif name == "structured_outputs":
                value = as_structured_outputs(value)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "extra", {})
        self._validate()

    def _validate(self) -> None:
        self._validate_numbers()
        self._validate_counts()
        self._validate_lists()

    def _validate_numbers(self) -> None:
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            _check(ok, name, f"must be a finite number, got {value!r}")
        _check(
            0.0 <= self.temperature <= MAX_TEMPERATURE,
            "temperature",
            f"must be >= 0 and <= {MAX_TEMPERATURE:g}, got {self.temperature}",
        )
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check(
            0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY,
            "repetition_penalty",
            f"must be > 0 and <= {MAX_REPETITION_PENALTY:g}, got {self.repetition_penalty}",
        )
        _in_range("presence_penalty", self.presence_penalty, -MAX_ABS_PENALTY, MAX_ABS_PENALTY)
        _in_range("frequency_penalty", self.frequency_penalty, -MAX_ABS_PENALTY, MAX_ABS_PENALTY)
        _check(self.seed is None or _is_int(self.seed), "seed", f"must be an integer, got {self.seed!r}")
        if self.seed is not None:
            _check(SEED_MIN <= self.seed <= SEED_MAX, "seed", f"must fit in 64 bits (signed), got {self.seed}")
        for token_id, bias in self.logit_bias:
            _check(token_id >= 0, "logit_bias", f"keys must be token ids >= 0, got {token_id}")
            _check(
                math.isfinite(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS,
                "logit_bias",
                f"values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias} for {token_id}",
            )

    def _validate_counts(self) -> None:
        _check(_is_int(self.n) and 1 <= self.n <= MAX_N, "n", f"must be an integer >= 1 and <= {MAX_N}, got {self.n}")
        _check(
            _is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1),
            "top_k",
            f"must be -1 (off) or >= 1, got {self.top_k}",
        )
        _check(
            self.max_tokens is None or (_is_int(self.max_tokens) and 1 <= self.max_tokens <= MAX_SEQUENCE_TOKENS),
            "max_tokens",
            f"must be None or an integer >= 1 and <= {MAX_SEQUENCE_TOKENS}, got {self.max_tokens}",
        )
        _check(
            _is_int(self.min_tokens) and 0 <= self.min_tokens <= MAX_SEQUENCE_TOKENS,
            "min_tokens",
            f"must be an integer >= 0 and <= {MAX_SEQUENCE_TOKENS}, got {self.min_tokens}",
        )
        if self.max_tokens is not None:
            _check(
                self.min_tokens <= self.max_tokens,
                "min_tokens",
                f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}",
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            ok = value is None or (_is_int(value) and 0 <= value <= MAX_LOGPROBS)
            _check(ok, name, f"must be None or in [0, {MAX_LOGPROBS}], got {value}")
        _check(
            self.logprobs_mode in LOGPROBS_MODES,
            "logprobs_mode",
            f"must be one of {', '.join(LOGPROBS_MODES)}, got {self.logprobs_mode!r}",
        )

    def _validate_lists(self) -> None:
        _at_most("stop", len(self.stop), MAX_STOP_STRINGS, "strings")
        _check(all(s for s in self.stop), "stop", "must not contain empty strings")
        longest = max((len(s) for s in self.stop), default=0)
        _check(longest <= MAX_STOP_CHARS, "stop", f"strings must be at most {MAX_STOP_CHARS} characters, got {longest}")
        _at_most("stop_token_ids", len(self.stop_token_ids), MAX_STOP_TOKEN_IDS, "ids")
        lowest = min(self.stop_token_ids, default=0)
        _check(lowest >= 0, "stop_token_ids", f"must be token ids >= 0, got {lowest}")
        _at_most("logit_bias", len(self.logit_bias), MAX_LOGIT_BIAS_ENTRIES, "entries")

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ``ValueError`` unless every token id and count here fits a vocabulary of ``vocab_size``.

        The sampler indexes its logits by these ids and asks top-k of them, so
        an id past the vocabulary would fail a whole step, not just this request.
        """
        for name, ids in (("logit_bias", [t for t, _ in self.logit_bias]), ("stop_token_ids", self.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"{name} token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        _check(
            self.top_k <= vocab_size, "top_k", f"must be -1 (off) or <= the vocabulary ({vocab_size}), got {self.top_k}"
        )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or value <= vocab_size, name, f"must be <= the vocabulary ({vocab_size}), got {value}")

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with ``changes``, validated again (``dataclasses.replace`` would pass ``extra`` to ``__init__``)."""
        current = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return SamplingParams(**(current | changes))

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _as_str_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def _as_bias_pairs(value: Any) -> tuple[tuple[int, float], ...]:
    if not value:
        return ()
    items = value.items() if isinstance(value, dict) else value
    try:
        return tuple(sorted((int(token), float(bias)) for token, bias in items))
    except (TypeError, ValueError) as error:
        raise ValueError(f"logit_bias must map token ids to numbers: {error}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _in_range(name: str, value: float, low: float, high: float) -> None:
    _check(low <= value <= high, name, f"must be in [{low:g}, {high:g}], got {value}")


def _at_most(name: str, count: int, limit: int, what: str) -> None:
    _check(count <= limit, name, f"may hold at most {limit} {what}, got {count}")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name} {message}")
