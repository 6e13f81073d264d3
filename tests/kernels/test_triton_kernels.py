"""Triton kernels against the torch reference on random inputs.

On a machine without a GPU they run under ``TRITON_INTERPRET=1`` (set by
conftest), in float32 and float16 only: the interpreter mishandles bfloat16.
Tolerances: float32 1e-4 absolute on outputs of magnitude ~1; float16 2e-3
(its rounding of the inputs and of the probabilities before the P @ V dot).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hawker.config import RopeScaling
from hawker.kernels.decode_attention import num_splits_for, paged_decode_attention
from hawker.kernels.elementwise import rms_norm, rotary_in_place, silu_and_mul
from hawker.kernels.kv_cache import write_kv
from hawker.kernels.prefill_attention import paged_prefill_attention
from hawker.layers.activation import silu_and_mul as torch_silu_and_mul
from hawker.layers.norm import RMSNorm
from hawker.layers.rotary import RotaryEmbedding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3}


def random_block_tables(context_lens: list[int], block_size: int, num_blocks: int, seed: int) -> torch.Tensor:
    """Distinct random blocks for each sequence, padded with 0 to the longest table."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_blocks, generator=generator).tolist()
    widths = [-(-n // block_size) for n in context_lens]
    tables, used = [], 0
    for width in widths:
        tables.append(order[used : used + width] + [0] * (max(widths) - width))
        used += width
    return torch.tensor(tables, dtype=torch.int32)


def reference_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    context_lens: list[int],
    scale: float,
) -> torch.Tensor:
    """float64 attention of each sequence's one query over its cached keys (grouped-query)."""
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // kv_heads
    outs = []
    for row, length in enumerate(context_lens):
        blocks = tables[row, : -(-length // block_size)].long()
        keys = k_cache[blocks].flatten(0, 1)[:length].double().repeat_interleave(group, dim=1)  # [L, H, D]
        values = v_cache[blocks].flatten(0, 1)[:length].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[row].double(), keys) * scale
        outs.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), values))
    return torch.stack(outs)


CASES = [
    # (head_dim, group = query heads per KV head, block_size, dtype)
    *itertools.product([64, 128], [1, 4, 8], [16], [torch.float32]),
    *itertools.product([64], [1, 4], [32], [torch.float32, torch.float16]),
    (128, 8, 32, torch.float16),
]


@pytest.mark.parametrize(("head_dim", "group", "block_size", "dtype"), CASES)
def test_paged_decode_attention_matches_reference(
    head_dim: int, group: int, block_size: int, dtype: torch.dtype
) -> None:
    torch.manual_seed(head_dim + group + block_size)
    kv_heads, num_blocks = 2, 24
    # Lengths end mid-block, on a block edge, at 1 token, and span several splits.
    context_lens = [1, block_size, 3 * block_size + 5, 2 * block_size - 1]
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(len(context_lens), kv_heads * group, head_dim, dtype=dtype, device=DEVICE)
    tables = random_block_tables(context_lens, block_size, num_blocks, seed=group).to(DEVICE)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    scale = 1 / math.sqrt(head_dim)
    expected = reference_decode(q.cpu(), k_cache.cpu(), v_cache.cpu(), tables.cpu(), context_lens, scale)
    for splits in (1, 3):
        out = paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, num_splits=splits)
        assert out.dtype == dtype
        error = (out.cpu().double() - expected).abs().max().item()
        assert error <= TOLERANCE[dtype], f"{splits} split(s): max error {error:.2e}"


def reference_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    runs: list[tuple[int, int]],
    scale: float,
) -> torch.Tensor:
    """float64 causal attention: run (query_len, context_len) holds the last query_len positions."""
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // kv_heads
    outs, first = [], 0
    for row, (query_len, length) in enumerate(runs):
        blocks = tables[row, : -(-length // block_size)].long()
        keys = k_cache[blocks].flatten(0, 1)[:length].double().repeat_interleave(group, dim=1)
        values = v_cache[blocks].flatten(0, 1)[:length].double().repeat_interleave(group, dim=1)
        queries = q[first : first + query_len].double()
        scores = torch.einsum("thd,lhd->htl", queries, keys) * scale
        query_pos = torch.arange(length - query_len, length)
        hidden = torch.arange(length)[None, :] > query_pos[:, None]
        scores = scores.masked_fill(hidden, float("-inf"))
        outs.append(torch.einsum("htl,lhd->thd", scores.softmax(-1), values))
        first += query_len
    return torch.cat(outs)


PREFILL_CASES = [
    # (head_dim, group, block_size, dtype, block_m)
    (64, 1, 16, torch.float32, 16),
    (128, 4, 16, torch.float32, 32),
    (64, 8, 32, torch.float32, 16),
    (64, 4, 32, torch.float16, 16),
    (128, 1, 16, torch.float16, 16),
]


@pytest.mark.parametrize(("head_dim", "group", "block_size", "dtype", "block_m"), PREFILL_CASES)
def test_paged_prefill_attention_of_a_mixed_batch_matches_reference(
    head_dim: int, group: int, block_size: int, dtype: torch.dtype, block_m: int
) -> None:
    torch.manual_seed(head_dim * group + block_size)
    kv_heads, num_blocks = 2, 24
    # (query tokens, context tokens): two decodes, a whole prompt ending
    # mid-block, a chunk after a cached prefix, a one-token prompt.
    runs = [(1, 37), (2 * block_m + 3, 2 * block_m + 3), (1, block_size), (block_m + 5, block_m + 5 + 29), (1, 1)]
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    tokens = sum(n for n, _ in runs)
    q = torch.randn(tokens, kv_heads * group, head_dim, dtype=dtype, device=DEVICE)
    tables = random_block_tables([length for _, length in runs], block_size, num_blocks, seed=group).to(DEVICE)
    starts = torch.tensor([0, *itertools.accumulate(n for n, _ in runs)], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([length for _, length in runs], dtype=torch.int32, device=DEVICE)
    scale = 1 / math.sqrt(head_dim)
    expected = reference_prefill(q.cpu(), k_cache.cpu(), v_cache.cpu(), tables.cpu(), runs, scale)
    max_query_len = max(n for n, _ in runs)
    out = paged_prefill_attention(q, k_cache, v_cache, tables, starts, lens, max_query_len, scale, block_m=block_m)
    error = (out.cpu().double() - expected).abs().max().item()
    assert error <= TOLERANCE[dtype], f"max error {error:.2e}"


def test_num_splits_fill_the_device_without_empty_splits() -> None:
    assert num_splits_for(batch=1, kv_heads=8, max_blocks=100, target_programs=264) == 33
    assert num_splits_for(batch=1, kv_heads=8, max_blocks=4, target_programs=264) == 4
    assert num_splits_for(batch=64, kv_heads=8, max_blocks=100, target_programs=264) == 1


@pytest.mark.parametrize(("block_size", "dtype"), [(16, torch.float32), (32, torch.float16)])
def test_write_kv_stores_each_token_at_its_slot_and_skips_padding(block_size: int, dtype: torch.dtype) -> None:
    torch.manual_seed(block_size)
    kv_heads, head_dim, num_blocks = 4, 64, 6
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([5, block_size + 3, 4 * block_size - 1, -1, 2 * block_size], device=DEVICE)
    # Keys as a strided view of a fused QKV output, as the model passes them.
    qkv = torch.randn(len(slots), 3 * kv_heads, head_dim, dtype=dtype, device=DEVICE)
    k, v = qkv[:, kv_heads : 2 * kv_heads], qkv[:, 2 * kv_heads :]
    write_kv(k, v, k_cache, v_cache, slots)
    expected_k, expected_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    for row, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected_k.view(-1, kv_heads, head_dim)[slot] = k[row]
            expected_v.view(-1, kv_heads, head_dim)[slot] = v[row]
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


ELEMENTWISE_DTYPES = [torch.float32, torch.float16]
# One rounding of a float16 value of magnitude ~4 (the largest here): 2^-11 * 4.
ELEMENTWISE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("size", [64, 576, 1000])
def test_rms_norm_with_and_without_residual_matches_the_torch_layer(dtype: torch.dtype, size: int) -> None:
    torch.manual_seed(size)
    layer = RMSNorm(size, 1e-5, dtype).to(DEVICE)
    layer.weight.data.normal_()
    x = torch.randn(7, size, dtype=dtype, device=DEVICE)
    residual = torch.randn_like(x)
    tolerance = ELEMENTWISE_TOLERANCE[dtype]
    assert torch.allclose(rms_norm(x, layer.weight, 1e-5), layer(x), atol=tolerance, rtol=tolerance)
    summed = x + residual
    fused_residual = residual.clone()
    out = rms_norm(x, layer.weight, 1e-5, residual=fused_residual)
    assert torch.equal(fused_residual, summed)
    assert torch.allclose(out, layer(summed), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
def test_silu_and_mul_matches_the_torch_layer(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    gate_up = torch.randn(5, 2 * 1536, dtype=dtype, device=DEVICE)
    tolerance = ELEMENTWISE_TOLERANCE[dtype]
    expected = torch_silu_and_mul(gate_up)
    assert torch.allclose(silu_and_mul(gate_up, block=512), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotary_in_place_matches_the_torch_layer(dtype: torch.dtype, head_dim: int) -> None:
    torch.manual_seed(head_dim)
    rotary = RotaryEmbedding(head_dim, 256, 10000.0, RopeScaling()).to(DEVICE)
    positions = torch.tensor([0, 1, 17, 255, 3], device=DEVICE)
    # Queries and keys stacked on the head dim, as the model rotates them (a strided view).
    qkv = torch.randn(len(positions), 6 + 2, head_dim, dtype=dtype, device=DEVICE)
    qk = qkv[:, :6]
    expected = rotary(positions, dtype).apply(qk)
    half = head_dim // 2
    cos, sin = rotary.cos[:, :half].contiguous(), rotary.signed_sin[:, half:].contiguous()
    untouched = qkv[:, 6:].clone()
    rotary_in_place(qk, cos, sin, positions)
    tolerance = ELEMENTWISE_TOLERANCE[dtype]
    assert torch.allclose(qk, expected, atol=tolerance, rtol=tolerance)
    assert torch.equal(qkv[:, 6:], untouched)
