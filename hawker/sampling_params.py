"""SamplingParams: what a request asks of the sampler, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

_GREEDY_EPS = 1e-5
LOGPROBS_MODES = ("processed", "raw")


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
            object.__setattr__(self, name, value)
        object.__setattr__(self, "extra", {})
        self._validate()

    def _validate(self) -> None:
        _check(isinstance(self.n, int) and self.n >= 1, "n", f"must be an integer >= 1, got {self.n}")
        _check(self.temperature >= 0.0, "temperature", f"must be >= 0, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k == -1 or self.top_k >= 1, "top_k", f"must be -1 (off) or >= 1, got {self.top_k}")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check(self.repetition_penalty > 0.0, "repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        _check(
            -2.0 <= self.presence_penalty <= 2.0, "presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}"
        )
        _check(
            -2.0 <= self.frequency_penalty <= 2.0,
            "frequency_penalty",
            f"must be in [-2, 2], got {self.frequency_penalty}",
        )
        _check(
            self.max_tokens is None or self.max_tokens >= 1,
            "max_tokens",
            f"must be >= 1 or None, got {self.max_tokens}",
        )
        _check(self.min_tokens >= 0, "min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None:
            _check(
                self.min_tokens <= self.max_tokens,
                "min_tokens",
                f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}",
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or 0 <= value <= 20, name, f"must be None or in [0, 20], got {value}")
        _check(
            self.logprobs_mode in LOGPROBS_MODES,
            "logprobs_mode",
            f"must be one of {', '.join(LOGPROBS_MODES)}, got {self.logprobs_mode!r}",
        )
        _check(all(s for s in self.stop), "stop", "must not contain empty strings")
        _check(self.seed is None or isinstance(self.seed, int), "seed", f"must be an integer, got {self.seed!r}")
        for token_id, bias in self.logit_bias:
            _check(token_id >= 0, "logit_bias", f"keys must be token ids >= 0, got {token_id}")
            _check(-100.0 <= bias <= 100.0, "logit_bias", f"values must be in [-100, 100], got {bias} for {token_id}")

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


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name} {message}")
