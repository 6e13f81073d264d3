"""The engine end to end on the Triton attention backend: logit parity with transformers.

Without a GPU the kernels run in Triton's interpreter (float32), so the
prompts are few; the tolerance is test_parity's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hawker import LLM
from tests.support.parity import assert_parity, make_prompts, reference_generate, run_hawker


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_triton_backend_keeps_parity_with_transformers(arch: str, tiny_checkpoints: dict[str, Path]) -> None:
    # Mixed steps: prompts of different lengths, chunked (16-token budget), then decodes.
    # 16 new tokens (the longest prompt, 24, then crosses into a third block): every step runs in Triton's
    # interpreter on a CPU.
    prompts = make_prompts(seed=7)[:4]
    reference = reference_generate(tiny_checkpoints[arch], prompts, new_tokens=16)
    llm = LLM(
        str(tiny_checkpoints[arch]),
        dtype="float32",
        attention_backend="triton",
        block_size=16,
        max_num_batched_tokens=16,
    )
    assert llm.engine.config.attention_backend == "triton"
    tokens, logits = run_hawker(llm, prompts, new_tokens=16)
    assert_parity(reference, tokens, logits)
    llm.engine.kv.check_invariants()


def test_triton_backend_rejects_options_it_cannot_honour(tiny_checkpoints: dict[str, Path]) -> None:
    checkpoint = str(tiny_checkpoints["llama"])
    with pytest.raises(ValueError, match="block_size"):
        LLM(checkpoint, dtype="float32", attention_backend="triton", block_size=8)
    with pytest.raises(ValueError, match="compile_decode_max_rows"):
        LLM(checkpoint, dtype="float32", attention_backend="triton", compile_decode_max_rows=4)
    with pytest.raises(ValueError, match="attention_backend"):
        LLM(checkpoint, dtype="float32", attention_backend="flash")
