"""The in-place CPU prefill attention kernel: causal attention of prompt chunks over the paged cache.

Against SDPA over the gathered context (float32 reference) for each dtype,
head size, grouped-query shape and block size, chunks with and without a
cached prefix; every query's bits independent of its chunk (a whole prompt
and its cached tail agree), which is what consistent numerics relies on.
Each with AMX tile multiplies (where the CPU has them) and with their off
switch, the vector dot products.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hawker import LLM, SamplingParams
from hawker.kernels import cpu_prefill_attention
from hawker.kernels.cpu_prefill_attention import paged_prefill_attention
from tests.support.paged_caches import scattered_caches

pytestmark = pytest.mark.skipif(
    not cpu_prefill_attention.available(torch.float32), reason="no C compiler: the kernel cannot be built"
)

# Against a float32 reference; bfloat16 rounds the probabilities too (as flash attention does).
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 3e-3}

# HAWKER_PREFILL_ATTENTION_AMX: tile multiplies where the CPU has AMX (1), vector dot products (0).
AMX_SETTINGS = ["1", "0"]

Case = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _paged_case(
    chunks: list[tuple[int, int]], heads: int, kv_heads: int, dim: int, block_size: int, dtype: torch.dtype, seed: int
) -> Case:
    """Queries of (length, start) chunks, one sequence each, over caches scattered across shuffled blocks."""
    generator = torch.Generator().manual_seed(seed)
    contexts = [start + length for length, start in chunks]
    k_cache, v_cache, tables = scattered_caches(contexts, kv_heads, dim, block_size, dtype, generator)
    lengths = [length for length, _ in chunks]
    # Queries as a strided view of a fused [tokens, heads + kv heads, dim] tensor, as the model passes them.
    q = torch.randn(sum(lengths), heads + 2 * kv_heads, dim, generator=generator).to(dtype)[:, :heads]
    rows = torch.tensor([sum(lengths[:index]) for index in range(len(chunks))])
    starts = torch.tensor([start for _, start in chunks])
    return q, k_cache, v_cache, tables, rows, torch.tensor(lengths), starts


def _reference(case: Case, scale: float) -> torch.Tensor:
    q, k_cache, v_cache, tables, rows, lens, starts = case
    block_size, kv_heads, dim = k_cache.shape[1:]
    out = torch.zeros(q.shape)
    for chunk, (row, length, start) in enumerate(zip(rows.tolist(), lens.tolist(), starts.tolist(), strict=True)):
        positions = torch.arange(start + length)
        slots = tables[chunk, positions // block_size] * block_size + positions % block_size
        keys = k_cache.reshape(-1, kv_heads, dim)[slots].transpose(0, 1).float()
        values = v_cache.reshape(-1, kv_heads, dim)[slots].transpose(0, 1).float()
        queries = q[row : row + length].transpose(0, 1).float()
        mask = positions.unsqueeze(0) <= torch.arange(start, start + length).unsqueeze(1)
        attended = F.scaled_dot_product_attention(
            queries[None], keys[None], values[None], attn_mask=mask[None, None], scale=scale, enable_gqa=True
        )
        out[row : row + length] = attended[0].transpose(0, 1)
    return out


@pytest.mark.parametrize("amx", AMX_SETTINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size"), [(9, 3, 64, 16), (4, 4, 32, 5), (8, 2, 128, 16), (6, 2, 48, 4)]
)
def test_matches_sdpa(
    dtype: torch.dtype, heads: int, kv_heads: int, dim: int, block_size: int, amx: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cpu_prefill_attention.AMX_VARIABLE, amx)
    # Whole prompts, a cached prefix's tail, one-token tails, lengths across the 16-query tiles and 16-key blocks.
    chunks = [(37, 0), (5, 20), (1, 100), (70, 0), (16, 16), (33, 7)]
    case = _paged_case(chunks, heads, kv_heads, dim, block_size, dtype, seed=heads + dim)
    out = paged_prefill_attention(*case, dim**-0.5)
    assert out.dtype == dtype and out.shape == case[0].shape
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), _reference(case, dim**-0.5), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("amx", AMX_SETTINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_query_gets_the_same_bits_in_any_chunk(dtype: torch.dtype, amx: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_prefill_attention.AMX_VARIABLE, amx)
    q, k_cache, v_cache, tables, *_ = _paged_case([(300, 0)], 9, 3, 64, 16, dtype, seed=3)
    whole = paged_prefill_attention(q, k_cache, v_cache, tables, *map(torch.tensor, ([0], [300], [0])), 0.125)
    for start in (1, 15, 16, 17, 100, 299):
        tail = paged_prefill_attention(
            q[start:], k_cache, v_cache, tables, *map(torch.tensor, ([0], [300 - start], [start])), 0.125
        )
        assert torch.equal(tail, whole[start:]), start
        # The same tail beside another sequence's chunk, in a later row.
        both = torch.cat([q[:7], q[start:]])
        two_tables = torch.cat([tables, tables])
        together = paged_prefill_attention(
            both, k_cache, v_cache, two_tables, *map(torch.tensor, ([0, 7], [7, 300 - start], [0, start])), 0.125
        )
        assert torch.equal(together[7:], whole[start:]), start


@pytest.mark.skipif(not cpu_prefill_attention.amx_available(), reason="this CPU has no AMX tiles")
def test_tile_multiplies_and_vector_dot_products_agree_on_a_long_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    # Past a thousand keys and several 16-row tiles of grouped heads, with a cached prefix and a second chunk.
    case = _paged_case([(700, 400), (45, 0)], 9, 3, 64, 16, torch.bfloat16, seed=5)
    outs = {}
    for amx in AMX_SETTINGS:
        monkeypatch.setenv(cpu_prefill_attention.AMX_VARIABLE, amx)
        outs[amx] = paged_prefill_attention(*case, 0.125).float()
    torch.testing.assert_close(outs["1"], outs["0"], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(outs["1"], _reference(case, 0.125), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("amx", AMX_SETTINGS)
@pytest.mark.parametrize("scale", [0.125, -0.125])
def test_scores_that_keep_rising_match_sdpa_and_keep_their_bits_in_any_chunk(
    scale: float, amx: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every key scores about half a unit above the one before (a unit below for a negative scale), so each row's
    # largest score moves on at almost every step of keys: the AMX path's rescaling of its running sums.
    monkeypatch.setenv(cpu_prefill_attention.AMX_VARIABLE, amx)
    q, k_cache, v_cache, tables, *_ = _paged_case([(300, 0)], 9, 3, 64, 16, torch.bfloat16, seed=11)
    positions = torch.arange(300)
    slots = tables[0, positions // 16] * 16 + positions % 16
    rising = torch.sign(torch.tensor(scale)) * positions[:, None, None] / 128.0
    k_cache.view(-1, 3, 64)[slots] = (rising + 0.05 * k_cache.view(-1, 3, 64)[slots].float()).to(torch.bfloat16)
    q.copy_(torch.ones_like(q))
    case = (q, k_cache, v_cache, tables, *map(torch.tensor, ([0], [300], [0])))
    whole = paged_prefill_attention(*case, scale)
    torch.testing.assert_close(whole.float(), _reference(case, scale), atol=2e-2, rtol=2e-2)
    for start in (1, 31, 32, 33, 250):
        tail = paged_prefill_attention(
            q[start:], k_cache, v_cache, tables, *map(torch.tensor, ([0], [300 - start], [start])), scale
        )
        assert torch.equal(tail, whole[start:]), start


def test_an_unknown_amx_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_prefill_attention.AMX_VARIABLE, "yes")
    case = _paged_case([(3, 0)], 4, 2, 64, 16, torch.bfloat16, seed=0)
    with pytest.raises(ValueError, match=cpu_prefill_attention.AMX_VARIABLE):
        paged_prefill_attention(*case, 0.125)


def test_rows_in_no_chunk_are_zero_and_it_runs_inside_a_compiled_graph() -> None:
    q, k_cache, v_cache, tables, rows, lens, starts = _paged_case([(5, 0), (9, 4)], 4, 2, 32, 16, torch.float32, 1)
    padded = torch.cat([q, torch.randn(3, 4, 32)])  # padding rows after the last chunk
    out = paged_prefill_attention(padded, k_cache, v_cache, tables, rows, lens, starts, 0.25)
    assert torch.equal(out[-3:], torch.zeros(3, 4, 32))

    def step(q: torch.Tensor) -> torch.Tensor:
        return paged_prefill_attention(q * 2.0, k_cache, v_cache, tables, rows, lens, starts, 0.25) + 1.0

    with torch._dynamo.config.patch(disable=False):
        compiled = torch.compile(step, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(q), step(q))


def test_engine_prefills_through_the_kernel_by_default_and_its_off_switch_agrees(
    tiny_checkpoints: dict[str, Path],
) -> None:
    checkpoint = str(tiny_checkpoints["llama"])
    on = LLM(checkpoint, dtype="float32", block_size=4)
    off = LLM(checkpoint, dtype="float32", block_size=4, native_prefill_attention=False)
    assert on.engine.config.native_prefill_attention and not off.engine.config.native_prefill_attention
    prompts = [list(range(3, 40)), list(range(50, 55))]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outputs = zip(
        on.generate(prompts, params, use_tqdm=False), off.generate(prompts, params, use_tqdm=False), strict=True
    )
    for a, b in outputs:
        assert a.prompt_logprobs is not None and b.prompt_logprobs is not None
        for token, x, y in zip(a.prompt_token_ids[1:], a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True):
            assert x is not None and y is not None
            assert abs(x[token].logprob - y[token].logprob) < 1e-4
