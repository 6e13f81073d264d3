"""Benchmark workloads: random prompts and output lengths from a fixed seed.

``WorkloadSpec()`` is the standard workload; ``WORKLOADS`` names the shapes
of work the CPU comparison runs (``benchmarks/compare_cpu.py``), each with
its own seed so that every engine gets the same prompts in every run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class WorkloadSpec:
    num_prompts: int = 128
    min_input: int = 32
    max_input: int = 512
    min_output: int = 32
    max_output: int = 256
    seed: int = 0
    # Tokens of one random prefix (a "system prompt") put before every
    # prompt; the input lengths are those of the questions after it.
    shared_prefix: int = 0

    def describe(self) -> str:
        """A short description, e.g. ``"48 prompts, 32-256 in, 32-128 out"``."""
        prefix = f"{self.shared_prefix}-token shared prefix + " if self.shared_prefix else ""
        return (
            f"{self.num_prompts} prompts, {prefix}{self.min_input}-{self.max_input} in, "
            f"{self.min_output}-{self.max_output} out"
        )


# The named workloads, in the order the comparison runs them.
WORKLOADS: dict[str, WorkloadSpec] = {
    "many-short": WorkloadSpec(num_prompts=256, min_input=16, max_input=128, min_output=16, max_output=128, seed=1),
    "long-prompts": WorkloadSpec(num_prompts=32, min_input=1000, max_input=2000, min_output=16, max_output=64, seed=2),
    "long-outputs": WorkloadSpec(num_prompts=32, min_input=16, max_input=64, min_output=256, max_output=512, seed=3),
    "fits-at-once": WorkloadSpec(num_prompts=48, min_input=32, max_input=256, min_output=32, max_output=128, seed=0),
    "standard": WorkloadSpec(),
    "shared-prefix": WorkloadSpec(
        num_prompts=64, min_input=16, max_input=64, min_output=32, max_output=128, seed=5, shared_prefix=1000
    ),
}


def shrunk(spec: WorkloadSpec, divisor: int, minimum: int = 2) -> WorkloadSpec:
    """The same shape with ``divisor`` times fewer prompts (at least ``minimum``), for smoke runs."""
    return replace(spec, num_prompts=max(minimum, spec.num_prompts // divisor))


@dataclass(frozen=True)
class WorkItem:
    prompt_token_ids: list[int]
    output_len: int


def make_workload(spec: WorkloadSpec, vocab_size: int, special_ids: set[int]) -> list[WorkItem]:
    """Prompts of random token ids (no special tokens) with random lengths."""
    rng = random.Random(spec.seed)
    ordinary = [t for t in range(vocab_size) if t not in special_ids]
    prefix = [rng.choice(ordinary) for _ in range(spec.shared_prefix)]
    items = []
    for _ in range(spec.num_prompts):
        length = rng.randint(spec.min_input, spec.max_input)
        items.append(
            WorkItem(
                prompt_token_ids=prefix + [rng.choice(ordinary) for _ in range(length)],
                output_len=rng.randint(spec.min_output, spec.max_output),
            )
        )
    return items
