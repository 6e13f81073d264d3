"""The standard offline workload: random prompts and output lengths from a fixed seed."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkloadSpec:
    num_prompts: int = 128
    min_input: int = 32
    max_input: int = 512
    min_output: int = 32
    max_output: int = 256
    seed: int = 0


@dataclass(frozen=True)
class WorkItem:
    prompt_token_ids: list[int]
    output_len: int


def make_workload(spec: WorkloadSpec, vocab_size: int, special_ids: set[int]) -> list[WorkItem]:
    """Prompts of random token ids (no special tokens) with random lengths."""
    rng = random.Random(spec.seed)
    ordinary = [t for t in range(vocab_size) if t not in special_ids]
    items = []
    for _ in range(spec.num_prompts):
        length = rng.randint(spec.min_input, spec.max_input)
        items.append(
            WorkItem(
                prompt_token_ids=[rng.choice(ordinary) for _ in range(length)],
                output_len=rng.randint(spec.min_output, spec.max_output),
            )
        )
    return items
