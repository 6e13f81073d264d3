"""Checks of a request against the model and the KV pool, before anything is allocated for it."""

from __future__ import annotations

from dataclasses import dataclass

from hawker.engine.kv_cache import blocks_for_tokens
from hawker.sampling_params import SamplingParams


@dataclass(frozen=True)
class RequestLimits:
    """What bounds a request: the model's vocabulary and context, and the KV pool."""

    vocab_size: int
    max_model_len: int
    block_size: int
    num_blocks: int


def check_request(prompt_token_ids: list[int], params: SamplingParams, limits: RequestLimits) -> int:
    """Raise ``ValueError`` (saying what is wrong) unless the request fits; returns its max_tokens."""
    num_prompt = len(prompt_token_ids)
    if num_prompt == 0:
        raise ValueError("the prompt is empty: at least one token is needed")
    vocab = limits.vocab_size
    bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
    params.check_vocab(vocab)
    limit = limits.max_model_len
    if num_prompt >= limit:
        raise ValueError(f"the prompt has {num_prompt} tokens; max_model_len is {limit}, so at most {limit - 1} fit")
    max_tokens = params.max_tokens if params.max_tokens is not None else limit - num_prompt
    if num_prompt + max_tokens > limit:
        raise ValueError(
            f"max_tokens is {max_tokens} and the prompt has {num_prompt} tokens: "
            f"{num_prompt + max_tokens} exceeds max_model_len {limit}"
        )
    if params.min_tokens > max_tokens:
        raise ValueError(f"min_tokens must be <= max_tokens ({max_tokens}), got {params.min_tokens}")
    needed = blocks_for_tokens(num_prompt + max_tokens, limits.block_size)
    if needed > limits.num_blocks:
        raise ValueError(
            f"the request needs {needed} KV blocks ({num_prompt} prompt + {max_tokens} new tokens) "
            f"but the pool has only {limits.num_blocks}"
        )
    return max_tokens
