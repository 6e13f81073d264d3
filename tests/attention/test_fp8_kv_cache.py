"""An 8-bit KV cache (``kv_cache_dtype``): the kernels read it exactly, and the engine keeps logit parity
with transformers whose cache rounds keys and values the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from hawker import LLM
from hawker.cli import _engine_kwargs, build_parser
from hawker.config import KV_CACHE_DTYPES
from hawker.kernels import cpu_decode_attention, cpu_prefill_attention
from hawker.kernels.cpu_decode_attention import paged_decode_attention
from hawker.kernels.cpu_prefill_attention import paged_prefill_attention
from tests.support.paged_caches import scattered_caches
from tests.support.parity import (
    FP8_RELATIVE_TOLERANCE,
    assert_parity,
    assert_pool_full,
    make_prompts,
    rounding_reference,
    run_hawker,
)

FLOAT8 = [torch.float8_e4m3fn, torch.float8_e5m2]
needs_kernels = pytest.mark.skipif(
    not (cpu_decode_attention.available(torch.float32, 3, 64) and cpu_prefill_attention.available(torch.float32)),
    reason="no C compiler: the kernels cannot be built",
)


# ------------------------------------------------------------------ kernels


@needs_kernels
@pytest.mark.parametrize("cache_dtype", FLOAT8)
@pytest.mark.parametrize("query_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 2, 48), (8, 1, 128)])
def test_kernels_read_an_8_bit_cache_as_its_exact_values(
    cache_dtype: torch.dtype, query_dtype: torch.dtype, heads: int, kv_heads: int, dim: int
) -> None:
    # Both kernels must give the very bits they give over the same values held in the queries' dtype:
    # widening an 8-bit float is exact, so any difference is a misread element. x3 reaches the large
    # exponents, and randn's small values the subnormals.
    generator = torch.Generator().manual_seed(1)
    lens = [1, 17, 100, 333]
    k_cache, v_cache, tables = scattered_caches(lens, kv_heads, dim, 16, torch.float32, generator)
    k_cache, v_cache = (k_cache * 3).to(cache_dtype), v_cache.to(cache_dtype)
    wide_k, wide_v = k_cache.to(query_dtype), v_cache.to(query_dtype)
    q = torch.randn(len(lens), heads, dim, generator=generator).to(query_dtype)
    context_lens = torch.tensor(lens)
    narrow = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, dim**-0.5)
    assert torch.equal(narrow, paged_decode_attention(q, wide_k, wide_v, tables, context_lens, dim**-0.5))

    prompt = torch.randn(30, heads, dim, generator=generator).to(query_dtype)
    chunks = (tables[1:3], torch.tensor([0, 10]), torch.tensor([10, 20]), torch.tensor([7, 80]), dim**-0.5)
    narrow = paged_prefill_attention(prompt, k_cache, v_cache, *chunks)
    assert torch.equal(narrow, paged_prefill_attention(prompt, wide_k, wide_v, *chunks))


@needs_kernels
def test_kernels_refuse_a_cache_of_another_wide_dtype() -> None:
    generator = torch.Generator().manual_seed(0)
    k_cache, v_cache, tables = scattered_caches([5], 2, 32, 16, torch.float16, generator)
    q = torch.randn(1, 4, 32)
    with pytest.raises((ValueError, RuntimeError), match="cache"):
        paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor([5]), 0.2)


# ------------------------------------------------------------------- engine


NEW_TOKENS = 16


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("fp8", {}),
        ("fp8_e5m2", {}),
        # The torch paths (padded SDPA decodes, SDPA prefill) and chunked prefill mixed with decodes.
        ("fp8", {"native_decode_attention": False, "native_prefill_attention": False}),
        ("fp8_e4m3", {"max_num_batched_tokens": 16, "block_size": 4}),
    ],
)
def test_parity_with_transformers_rounding_its_cache_alike(
    name: str, options: dict[str, Any], tiny_checkpoints: dict[str, Path]
) -> None:
    checkpoint = tiny_checkpoints["llama"]
    prompts = make_prompts(seed=3)
    reference = rounding_reference(checkpoint, prompts, KV_CACHE_DTYPES[name], NEW_TOKENS)
    llm = LLM(str(checkpoint), dtype="float32", kv_cache_dtype=name, **options)
    assert all(k.dtype == KV_CACHE_DTYPES[name] for k, _ in llm.engine.runner.kv_caches)
    tokens, logits = run_hawker(llm, prompts, NEW_TOKENS)
    assert_parity(reference, tokens, logits, FP8_RELATIVE_TOLERANCE)
    assert_pool_full(llm)


def test_a_prefix_cache_hit_gives_the_cold_answer(tiny_checkpoints: dict[str, Path]) -> None:
    # The second run reads its prompt's first blocks back from the 8-bit cache; the first computed them.
    llm = LLM(str(tiny_checkpoints["qwen2"]), dtype="float32", kv_cache_dtype="fp8", block_size=4)
    prompts = make_prompts(seed=4)
    cold_tokens, cold_logits = run_hawker(llm, prompts, 8)
    warm_tokens, warm_logits = run_hawker(llm, prompts, 8)
    assert llm.engine.kv.stats.hit_tokens > 0
    assert warm_tokens == cold_tokens
    for cold, warm in zip(cold_logits, warm_logits, strict=True):
        torch.testing.assert_close(warm, cold, atol=1e-5, rtol=1e-5)


def test_an_8_bit_cache_holds_twice_the_blocks(tiny_checkpoints: dict[str, Path]) -> None:
    path = str(tiny_checkpoints["llama"])
    wide = LLM(path, dtype="bfloat16", kv_cache_memory_gb=0.01)
    narrow = LLM(path, dtype="bfloat16", kv_cache_memory_gb=0.01, kv_cache_dtype="fp8_e5m2")
    assert narrow.engine.kv.num_blocks == 2 * wide.engine.kv.num_blocks
    assert narrow.engine.runner.kv_caches[0][0].dtype == torch.float8_e5m2


def test_the_option_is_validated(tiny_checkpoints: dict[str, Path]) -> None:
    path = str(tiny_checkpoints["llama"])
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        LLM(path, dtype="float32", kv_cache_dtype="int3")
    with pytest.raises(ValueError, match="needs the torch attention backend"):
        LLM(path, dtype="float32", kv_cache_dtype="fp8", attention_backend="triton")
    args = build_parser().parse_args(["serve", "--kv-cache-dtype", "fp8_e5m2"])
    assert _engine_kwargs(args)["kv_cache_dtype"] == "fp8_e5m2"
