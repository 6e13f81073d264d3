"""Parity with transformers: tiny-model prompts, the reference's greedy tokens and logits, and the checks.

Also the 8-bit KV cache's reference: transformers with a cache that rounds keys and values the same way."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from hawker import LLM, SamplingParams
from tests.support.tiny_models import VOCAB_SIZE, load_reference

NUM_NEW_TOKENS = 32


RELATIVE_TOLERANCE = 1e-4


PROMPT_LENGTHS = (3, 9, 17, 24, 33, 41, 50, 64)


@dataclass(frozen=True)
class Reference:
    prompts: list[list[int]]
    tokens: list[list[int]]  # greedy continuation of each prompt
    logits: list[torch.Tensor]  # [NUM_NEW_TOKENS, vocab] for each prompt


def make_prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in PROMPT_LENGTHS]


def reference_generate(
    directory: Path,
    prompts: list[list[int]],
    new_tokens: int = NUM_NEW_TOKENS,
    make_cache: Callable[[transformers.PreTrainedConfig], transformers.Cache] | None = None,
) -> Reference:
    """transformers' greedy continuation of each prompt, with its logits; ``make_cache`` builds a KV cache
    of another kind for each prompt (default: transformers' own)."""
    model = load_reference(directory)
    tokens, logits = [], []
    with torch.no_grad():
        for prompt in prompts:
            cache = {} if make_cache is None else {"cache": make_cache(model.config)}
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                **cache,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
            tokens.append(out.sequences[0, len(prompt) :].tolist())
            logits.append(torch.cat(out.logits, dim=0).float())
    return Reference(prompts, tokens, logits)


def run_hawker(
    llm: LLM, prompts: list[list[int]], new_tokens: int = NUM_NEW_TOKENS
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy generation of all prompts in one batch; returns tokens and per-step logits."""
    seen: dict[str, list[torch.Tensor]] = defaultdict(list)

    def observe(ids: list[str], logits: torch.Tensor) -> None:
        for request_id, row in zip(ids, logits, strict=True):
            seen[request_id].append(row.clone())

    llm.engine.runner.logits_observer = observe
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.engine.runner.logits_observer = None
    tokens = [o.outputs[0].token_ids for o in outputs]
    logits = [torch.stack(seen[o.request_id]) for o in outputs]
    return tokens, logits


def assert_parity(
    ref: Reference, tokens: list[list[int]], logits: list[torch.Tensor], tolerance: float = RELATIVE_TOLERANCE
) -> float:
    worst = 0.0
    for i, prompt in enumerate(ref.prompts):
        assert tokens[i] == ref.tokens[i], f"greedy tokens differ for prompt {i} (length {len(prompt)})"
        assert logits[i].shape == ref.logits[i].shape
        diff = (logits[i] - ref.logits[i]).abs().amax(dim=-1)
        scale = ref.logits[i].abs().amax(dim=-1)
        ratio = (diff / scale).max().item()
        worst = max(worst, ratio)
        assert ratio <= tolerance, f"prompt {i}: relative logit error {ratio:.2e}"
    return worst


def assert_pool_full(llm: LLM) -> None:
    llm.engine.kv.check_invariants()
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    largest = torch.finfo(dtype).max
    return x.clamp(-largest, largest).to(dtype).to(x.dtype)


class RoundingCache(transformers.DynamicCache):
    """transformers' cache, keeping (and attending to) keys and values rounded to an 8-bit float."""

    def __init__(self, dtype: torch.dtype, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rounding_dtype = dtype

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = rounded(key_states, self.rounding_dtype), rounded(value_states, self.rounding_dtype)
        return super().update(keys, values, layer_idx, *args, **kwargs)


def rounding_reference(directory: Path, prompts: list[list[int]], dtype: torch.dtype, new_tokens: int) -> Reference:
    return reference_generate(directory, prompts, new_tokens, lambda config: RoundingCache(dtype, config=config))


# A key or value whose float32 value lies within rounding noise of the midpoint between two 8-bit floats
# may round either way here and in transformers (one step of e4m3 is 6 %), which moves a logit by ~1e-3 of
# the logits' scale; the rounding itself moves these tiny models' logits by more than their scale, and a
# misread element by as much, so this still tells a right cache from a wrong one.
FP8_RELATIVE_TOLERANCE = 5e-3
