"""Engine outputs -> OpenAI response bodies: choices, streamed deltas, logprobs, usage."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

from hawker.outputs import CompletionOutput, PositionLogprobs, RequestOutput

# What a logprob of -inf (a token the sampling filters ruled out: top_k, top_p, min_p) or NaN is
# reported as: JSON has no infinities, and vLLM's API reports the same floor.
LOWEST_LOGPROB = -9999.0


def json_logprob(logprob: float) -> float:
    """``logprob`` as JSON can hold it: no lower than ``LOWEST_LOGPROB`` (and never -inf or NaN)."""
    if math.isnan(logprob) or logprob < LOWEST_LOGPROB:
        return LOWEST_LOGPROB
    return logprob


@dataclass
class ChoiceCursor:
    """How much of one choice a stream has already sent."""

    text_len: int = 0
    num_tokens: int = 0
    finished: bool = False


@dataclass(frozen=True)
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None


@dataclass
class StreamState:
    """Per-choice cursors of one streamed response (choice index -> cursor)."""

    cursors: dict[int, ChoiceCursor] = field(default_factory=dict)

    def delta(self, choice_index: int, completion: CompletionOutput) -> Delta | None:
        """What is new in ``completion`` since the last call; None when nothing is."""
        cursor = self.cursors.setdefault(choice_index, ChoiceCursor())
        if cursor.finished:
            return None
        text = completion.text[cursor.text_len :]
        token_ids = completion.token_ids[cursor.num_tokens :]
        logprobs = completion.logprobs[cursor.num_tokens :] if completion.logprobs is not None else None
        cursor.text_len = len(completion.text)
        cursor.num_tokens = len(completion.token_ids)
        cursor.finished = completion.finish_reason is not None
        if not text and not token_ids and completion.finish_reason is None:
            return None
        return Delta(text, token_ids, logprobs, completion.finish_reason)


def usage(outputs: list[RequestOutput]) -> dict[str, Any]:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outputs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


class TokenText:
    """Token id -> its text and bytes, as logprobs report them.

    A token that holds only part of a UTF-8 character decodes to U+FFFD, so many
    such tokens would share one text and collapse in ``top_logprobs`` dicts. Like
    OpenAI's API, they are shown as ``bytes:\\xNN...`` with their real bytes.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._byte_decoder = {char: byte for byte, char in bytes_to_unicode().items()}
        # A token's text never changes, and logprobs ask for up to 21 tokens
        # per generated token: remember each answer.
        self._texts: dict[int, str] = {}
        self._bytes: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self._text(token_id)
        return text

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (byte-level BPE, byte-fallback pieces, or its decoded text)."""
        raw = self._bytes.get(token_id)
        if raw is None:
            raw = self._bytes[token_id] = self._raw_bytes(token_id)
        return raw

    def _text(self, token_id: int) -> str:
        text = str(self._tokenizer.decode([token_id]))  # one sequence: one string
        if "\ufffd" not in text:
            return text
        raw = self.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw)

    def _raw_bytes(self, token_id: int) -> bytes:
        piece = str(self._tokenizer.convert_ids_to_tokens(token_id))  # one id: one token
        byte_fallback = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if byte_fallback:
            return bytes([int(byte_fallback.group(1), 16)])
        if piece and all(char in self._byte_decoder for char in piece):
            return bytes(self._byte_decoder[char] for char in piece)
        return str(self._tokenizer.decode([token_id])).encode("utf-8")


def completion_logprobs(
    token_ids: list[int],
    logprobs: list[PositionLogprobs | None],
    token_text: TokenText,
) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    text_offset = 0
    for token_id, entry in zip(token_ids, logprobs, strict=True):
        text = token_text(token_id)
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
        if entry is None:  # the first prompt token has no context
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(json_logprob(entry[token_id].logprob))
        ranked = sorted(entry.items(), key=lambda item: item[1].rank)
        top_logprobs.append({token_text(tid): json_logprob(lp.logprob) for tid, lp in ranked})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(
    token_ids: list[int], logprobs: list[PositionLogprobs], token_text: TokenText, top: int
) -> dict[str, Any]:
    """The chat ``logprobs`` object: one entry per generated token with its top alternatives."""
    content = []
    for token_id, entry in zip(token_ids, logprobs, strict=True):
        ranked = sorted((item for item in entry.items() if item[1].rank <= top), key=lambda item: item[1].rank)
        content.append(
            {
                **_token_logprob(token_id, entry[token_id].logprob, token_text),
                "top_logprobs": [_token_logprob(tid, lp.logprob, token_text) for tid, lp in ranked[:top]],
            }
        )
    return {"content": content}


def _token_logprob(token_id: int, logprob: float, token_text: TokenText) -> dict[str, Any]:
    return {
        "token": token_text(token_id),
        "logprob": json_logprob(logprob),
        "bytes": list(token_text.token_bytes(token_id)),
    }
