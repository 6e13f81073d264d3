"""Batch-invariant mode: one seeded request gives bitwise the same tokens and logprobs in any batch.

20 random compositions: 1-32 requests of mixed prompt lengths and sampling
settings, chunked prefill on (16-token steps) or off, and sometimes a
prefix-cache hit on part of the request's prompt. The bar is equality, not
a tolerance. (Without deterministic=True the float32 case differs at the first composition.)
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from hawker import LLM, SamplingParams
from hawker.outputs import CompletionOutput
from tests.support.tiny_models import VOCAB_SIZE

TARGET = SamplingParams(temperature=0.8, top_p=0.95, seed=1234, max_tokens=10, logprobs=3, ignore_eos=True)


def _target_prompt() -> list[int]:
    rng = random.Random(99)
    return [rng.randrange(3, VOCAB_SIZE) for _ in range(37)]


def _fingerprint(completion: CompletionOutput) -> tuple:
    assert completion.logprobs is not None
    entries = [sorted((token, lp.logprob, lp.rank) for token, lp in entry.items()) for entry in completion.logprobs]
    return tuple(completion.token_ids), tuple(map(tuple, entries))


def _run_composition(llm: LLM, rng: random.Random, prompt: list[int]) -> tuple:
    others = []
    for _ in range(rng.randint(0, 31)):
        length = rng.randint(1, 64)
        params = SamplingParams(
            temperature=rng.choice([0.0, 0.7, 1.0]),
            seed=rng.randrange(1000),
            max_tokens=rng.randint(1, 14),
            ignore_eos=True,
        )
        others.append(([rng.randrange(3, VOCAB_SIZE) for _ in range(length)], params))
    if rng.random() < 0.5:
        # Put part of the target's prompt in the prefix cache first.
        shared = [*prompt[: rng.choice([8, 16, 32])], 5, 6, 7]
        llm.generate([shared], SamplingParams(max_tokens=1), use_tqdm=False)
    position = rng.randint(0, len(others))
    batch = [*others[:position], (prompt, TARGET), *others[position:]]
    outputs = llm.generate([p for p, _ in batch], [s for _, s in batch], use_tqdm=False)
    return _fingerprint(outputs[position].outputs[0])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_seeded_request_is_bitwise_identical_in_any_batch(tiny_checkpoints: dict[str, Path], dtype: str) -> None:
    checkpoint = str(tiny_checkpoints["llama"])
    prompt = _target_prompt()
    engines = {
        chunked: LLM(checkpoint, dtype=dtype, deterministic=True, block_size=8, max_num_batched_tokens=budget)
        for chunked, budget in ((True, 16), (False, 2048))
    }
    alone = LLM(checkpoint, dtype=dtype, deterministic=True, block_size=8)
    expected = _fingerprint(alone.generate([prompt], TARGET, use_tqdm=False)[0].outputs[0])
    rng = random.Random(f"compositions-{dtype}")
    for composition in range(14):
        llm = engines[rng.random() < 0.5]
        assert _run_composition(llm, rng, prompt) == expected, f"composition {composition} differs"
    for llm in engines.values():
        llm.engine.kv.check_invariants()


def test_deterministic_mode_refuses_shape_dependent_fast_paths(tiny_checkpoints: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="int4_decode_max_rows"):
        LLM(str(tiny_checkpoints["llama"]), deterministic=True, int4_decode_max_rows=16)
    with pytest.raises(ValueError, match="triton"):
        LLM(str(tiny_checkpoints["llama"]), deterministic=True, attention_backend="triton")
