"""Consistent numerics (the default on CPU): a greedy request's tokens and logprobs are bitwise the same
cold, after a prefix-cache hit, as any of its n choices, and beside other requests (up to 16 decodes).

The model is the tiny Llama on a 4-bit grid in bfloat16, so the int4 copies, the dense tiles, the
compiled decode step and the tiled attention all take part, as they do for the default GGUF.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hawker import LLM, SamplingParams
from hawker.attention.metadata import PrefillChunk
from hawker.attention.torch_backend import _prefill_tiled
from hawker.layers.batch_invariant import tiled_rows

MAX_TOKENS = 40
# Long enough that prefill tiles (128 rows) and decode key padding (16) are crossed.
PROMPT_LENGTHS = (37, 90, 150)


def _prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(11)
    return [torch.randint(3, 250, (length,), generator=generator).tolist() for length in PROMPT_LENGTHS]


def _greedy(n: int = 1) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, n=n, logprobs=3, ignore_eos=True)


def _fingerprint(completion) -> tuple:  # type: ignore[no-untyped-def]
    """Token ids and every logprob value, compared bitwise."""
    values = tuple(tuple(sorted((t, lp.logprob) for t, lp in entry.items())) for entry in completion.logprobs)
    return tuple(completion.token_ids), values


@pytest.fixture(scope="module")
def llm(grid_checkpoint: Path) -> Iterator[LLM]:
    # conftest turns torch.compile off for the suite; this module needs the compiled decode step.
    with torch._dynamo.config.patch(disable=False):
        yield LLM(str(grid_checkpoint), dtype="bfloat16", block_size=4, max_model_len=256)


def test_consistent_numerics_is_the_cpu_default(llm: LLM) -> None:
    config = llm.engine.config
    assert config.consistent_numerics and config.matmul is not None and config.matmul.consistent
    assert config.compile_decode_max_rows > 0


def test_greedy_is_the_same_cold_cached_as_n_choices_and_in_company(llm: LLM) -> None:
    for prompt in _prompts():
        cold = llm.generate([prompt], _greedy(), use_tqdm=False)[0]
        cached = llm.generate([prompt], _greedy(), use_tqdm=False)[0]
        assert cached.num_cached_tokens > 0  # the second run hit the prefix cache
        assert _fingerprint(cached.outputs[0]) == _fingerprint(cold.outputs[0])
        choices = llm.generate([prompt], _greedy(n=4), use_tqdm=False)[0].outputs
        assert [_fingerprint(c) for c in choices] == [_fingerprint(cold.outputs[0])] * 4
    # All three prompts at once, with another unrelated one: mixed prefill/decode steps, shared decode steps.
    others = [list(range(5, 60))]
    together = llm.generate(_prompts() + others, _greedy(), use_tqdm=False)
    for prompt, output in zip(_prompts(), together, strict=False):
        alone = llm.generate([prompt], _greedy(), use_tqdm=False)[0]
        assert _fingerprint(output.outputs[0]) == _fingerprint(alone.outputs[0])


def test_tiled_rows_give_each_row_one_result_whatever_the_row_count() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(384, 320, generator=generator).bfloat16()
    rows = torch.randn(700, 320, generator=generator).bfloat16()
    reference = tiled_rows(lambda x: F.linear(x, weight), rows, 128)
    for count in (17, 100, 128, 129, 300, 512):
        for shift in (0, 3, 64):
            shifted = torch.cat([torch.randn(shift, 320, generator=generator).bfloat16(), rows[:count]])
            out = tiled_rows(lambda x: F.linear(x, weight), shifted, 128)[shift:]
            assert torch.equal(out, reference[:count]), (count, shift)


def test_tiled_prefill_attention_is_the_same_for_a_whole_prompt_and_its_cached_tail() -> None:
    """A query's result depends only on its position and the chunk's end, not on where the chunk starts."""
    generator = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, block, tile = 6, 2, 16, 4, 32
    length = 103
    q = torch.randn(length, heads, dim, generator=generator).bfloat16()
    k = torch.randn(length, kv_heads, dim, generator=generator).bfloat16()
    v = torch.randn(length, kv_heads, dim, generator=generator).bfloat16()
    num_blocks = -(-length // block)
    k_cache = torch.zeros(num_blocks, block, kv_heads, dim).bfloat16()
    v_cache = torch.zeros_like(k_cache)
    k_cache.view(-1, kv_heads, dim)[:length] = k
    v_cache.view(-1, kv_heads, dim)[:length] = v
    whole = _prefill_tiled(q, k, v, k_cache, v_cache, PrefillChunk(0, length, 0, None), 0.25, tile)
    slots = torch.arange(length)
    for start in (1, 31, 32, 70, 100, 102):
        chunk = PrefillChunk(0, length - start, start, slots)
        tail = _prefill_tiled(q[start:], k[start:], v[start:], k_cache, v_cache, chunk, 0.25, tile)
        assert torch.equal(tail, whole[start:]), start
    # And it is attention: close to one causal SDPA call over the whole prompt.
    expected = F.scaled_dot_product_attention(
        q.float().transpose(0, 1)[None],
        k.float().transpose(0, 1)[None],
        v.float().transpose(0, 1)[None],
        is_causal=True,
        scale=0.25,
        enable_gqa=True,
    )[0].transpose(0, 1)
    torch.testing.assert_close(whole.float(), expected, atol=2e-2, rtol=2e-2)
