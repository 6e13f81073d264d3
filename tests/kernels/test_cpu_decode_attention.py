"""The in-place CPU decode attention kernel against SDPA over a gathered context."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hawker import LLM
from hawker.attention.torch_metadata import TorchAttentionBackend
from hawker.kernels import amx_linear, cpu_decode_attention
from hawker.kernels.cpu_decode_attention import paged_decode_attention
from tests.support.paged_caches import scattered_caches

pytestmark = pytest.mark.skipif(
    not cpu_decode_attention.available(torch.float32, 3, 64), reason="no C compiler: the kernel cannot be built"
)

# Tolerances against a float32 reference: the kernel accumulates in float32
# and rounds its output once, like SDPA.
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _paged_case(
    lens: list[int], kv_heads: int, dim: int, block_size: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random caches, and block tables that scatter each sequence over shuffled blocks."""
    generator = torch.Generator().manual_seed(seed)
    k_cache, v_cache, tables = scattered_caches(lens, kv_heads, dim, block_size, dtype, generator)
    return k_cache, v_cache, tables, torch.tensor(lens)


def _reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor
) -> torch.Tensor:
    block_size, kv_heads, dim = k_cache.shape[1:]
    rows = []
    for seq, length in enumerate(lens.tolist()):
        positions = torch.arange(length)
        slots = tables[seq, positions // block_size] * block_size + positions % block_size
        keys = k_cache.reshape(-1, kv_heads, dim)[slots].transpose(0, 1).float()
        values = v_cache.reshape(-1, kv_heads, dim)[slots].transpose(0, 1).float()
        query = q[seq].float().unsqueeze(1)  # [H, 1, D]
        out = F.scaled_dot_product_attention(query[None], keys[None], values[None], scale=dim**-0.5, enable_gqa=True)
        rows.append(out[0, :, 0])
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size"), [(9, 3, 64, 16), (9, 3, 64, 24), (4, 4, 32, 5), (8, 1, 128, 32)]
)
def test_matches_sdpa(dtype: torch.dtype, heads: int, kv_heads: int, dim: int, block_size: int) -> None:
    lens = [1, 2, block_size, block_size + 1, 37, 300]
    k_cache, v_cache, tables, context_lens = _paged_case(lens, kv_heads, dim, block_size, dtype)
    # Queries as a strided view of a fused [tokens, heads + kv heads, dim] tensor, as the model passes them.
    fused = torch.randn(len(lens), heads + 2 * kv_heads, dim).to(dtype)
    q = fused[:, :heads]
    out = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, dim**-0.5)
    assert out.dtype == dtype and out.shape == (len(lens), heads, dim)
    expected = _reference(q, k_cache, v_cache, tables, context_lens)
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_a_sequence_gets_the_same_bits_in_any_batch() -> None:
    rng = random.Random(0)
    lens = [rng.randint(1, 400) for _ in range(40)]
    k_cache, v_cache, tables, context_lens = _paged_case(lens, 3, 64, 16, torch.bfloat16)
    q = torch.randn(len(lens), 9, 64).bfloat16()
    together = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, 0.125)
    for seq in (0, 17, 39):
        alone = paged_decode_attention(
            q[seq : seq + 1], k_cache, v_cache, tables[seq : seq + 1], context_lens[seq : seq + 1], 0.125
        )
        assert torch.equal(alone[0], together[seq])


def test_runs_inside_a_compiled_graph() -> None:
    k_cache, v_cache, tables, context_lens = _paged_case([5, 40, 70], 2, 32, 16, torch.float32)
    q = torch.randn(3, 4, 32)

    def step(q: torch.Tensor) -> torch.Tensor:
        return paged_decode_attention(q * 2.0, k_cache, v_cache, tables, context_lens, 0.25) + 1.0

    with torch._dynamo.config.patch(disable=False):
        compiled = torch.compile(step, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(q), step(q))


def test_engine_decodes_through_the_kernel_by_default(
    tiny_checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    original = TorchAttentionBackend._paged_decode

    def spy(self, decodes):  # type: ignore[no-untyped-def]
        calls.append(len(decodes))
        return original(self, decodes)

    monkeypatch.setattr(TorchAttentionBackend, "_paged_decode", spy)
    llm = LLM(str(tiny_checkpoints["llama"]), dtype="float32")
    assert llm.engine.config.native_decode_attention
    llm.generate([[1, 2, 3], [4, 5, 6, 7, 8]], use_tqdm=False)
    assert calls and max(calls) == 2


def test_the_operator_kernel_matches_the_ctypes_one() -> None:
    """The operator's kernel (C++ where it builds) and the ctypes wrapper give the same bits, a shape of heads
    first met in this call and strided queries too; bad arguments are refused with a ValueError."""
    lens = [3, 40, 129]
    for heads, kv_heads, dim in ((6, 2, 64), (5, 5, 48)):
        k_cache, v_cache, tables, context_lens = _paged_case(lens, kv_heads, dim, 16, torch.bfloat16, seed=3)
        fused = torch.randn(len(lens), heads + 2 * kv_heads, dim).bfloat16()
        for q in (fused[:, :heads], fused[:, :heads].contiguous()):
            expected = cpu_decode_attention._run(q, k_cache, v_cache, tables, context_lens, 0.1)
            assert torch.equal(paged_decode_attention(q, k_cache, v_cache, tables, context_lens, 0.1), expected)
    with pytest.raises(ValueError, match="cache"):
        paged_decode_attention(q.float(), k_cache, v_cache, tables, context_lens, 0.1)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size"), [(9, 3, 64, 16), (9, 3, 64, 5), (6, 2, 64, 40), (8, 1, 128, 32)]
)
def test_whole_sequence_items_give_the_bits_of_kv_head_items(
    cache_dtype: torch.dtype, heads: int, kv_heads: int, dim: int, block_size: int
) -> None:
    """The default work items (a whole sequence, every KV head) sum in the order the (sequence, KV head)
    items do, so switching them off (HAWKER_DECODE_ATTENTION_ITEMS=kv-head) changes speed, never bits;
    blocks of any size, runs of positions cut at block ends, 8-bit caches widened as they are read."""
    lens = [1, 2, 15, 16, 17, block_size + 1, 37, 300, 401]
    k_cache, v_cache, tables, context_lens = _paged_case(lens, kv_heads, dim, block_size, torch.float32, seed=5)
    k_cache, v_cache = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
    q = torch.randn(len(lens), heads, dim).bfloat16()
    outputs = [
        cpu_decode_attention._run(q, k_cache, v_cache, tables, context_lens, dim**-0.5, whole_sequences, amx=False)
        for whole_sequences in (True, False)
    ]
    assert torch.equal(outputs[0], outputs[1])
    expected = _reference(q, k_cache, v_cache, tables, context_lens)
    torch.testing.assert_close(outputs[0].float(), expected, atol=2e-2, rtol=2e-2)


def test_an_unknown_work_item_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_decode_attention.ITEMS_VARIABLE, "per-token")
    with pytest.raises(ValueError, match="sequence, kv-head"):
        cpu_decode_attention.whole_sequence_items()
    monkeypatch.setenv(cpu_decode_attention.ITEMS_VARIABLE, "kv-head")
    assert not cpu_decode_attention.whole_sequence_items()


@pytest.mark.parametrize(("heads", "kv_heads", "block_size"), [(9, 3, 16), (16, 4, 32), (6, 6, 48), (3, 1, 16)])
def test_amx_items_match_sdpa_and_the_vector_loops(heads: int, kv_heads: int, block_size: int) -> None:
    """Where the CPU has AMX, whole sequences of 64-dim heads in a bfloat16 cache multiply on tiles (keys and
    values read as they lie, every query head in one tile): each head attends to its own KV head only, short
    last runs and runs cut at block ends included; the vector loops and SDPA agree to bfloat16's rounding.
    (On a CPU without AMX both builds are the vector loops, and the comparison still holds.)"""
    lens = [1, 2, 15, 16, 17, block_size + 1, 37, 300, 401]
    k_cache, v_cache, tables, context_lens = _paged_case(lens, kv_heads, 64, block_size, torch.bfloat16, seed=9)
    q = torch.randn(len(lens), heads, 64, generator=torch.Generator().manual_seed(9)).bfloat16()
    on, off = (
        cpu_decode_attention._run(q, k_cache, v_cache, tables, context_lens, 0.125, True, amx=amx)
        for amx in (True, False)
    )
    expected = _reference(q, k_cache, v_cache, tables, context_lens)
    torch.testing.assert_close(on.float(), expected, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(on.float(), off.float(), atol=1e-2, rtol=1e-2)
    # The tiles serve these calls wherever the CPU has AMX (the matmul's probe asks the same of Linux).
    assert cpu_decode_attention.multiplies_on_tiles(heads, kv_heads, 64, block_size) == amx_linear.available()


def test_amx_items_give_a_sequence_the_same_bits_in_any_batch() -> None:
    """The tile path sums a sequence's rows in an order fixed by its own length: alone or beside others, first
    or last, it gets the same bits (what consistent numerics needs of decode attention)."""
    lens = [5, 33, 250, 64, 129]
    k_cache, v_cache, tables, context_lens = _paged_case(lens, 3, 64, 16, torch.bfloat16, seed=11)
    q = torch.randn(len(lens), 9, 64).bfloat16()
    together = cpu_decode_attention._run(q, k_cache, v_cache, tables, context_lens, 0.125, True, amx=True)
    for seq in range(len(lens)):
        alone = cpu_decode_attention._run(
            q[seq : seq + 1],
            k_cache,
            v_cache,
            tables[seq : seq + 1],
            context_lens[seq : seq + 1],
            0.125,
            True,
            amx=True,
        )
        assert torch.equal(alone[0], together[seq])
    flipped = cpu_decode_attention._run(
        q.flip(0), k_cache, v_cache, tables.flip(0), context_lens.flip(0), 0.125, True, amx=True
    )
    assert torch.equal(flipped.flip(0), together)


def test_the_amx_switch_and_what_the_tiles_do_not_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off by HAWKER_DECODE_ATTENTION_AMX=0; 8-bit caches, blocks not a multiple of 16 positions, more than 16
    query heads, 128-dim heads and kv-head items take the vector loops."""
    monkeypatch.delenv(cpu_decode_attention.AMX_VARIABLE, raising=False)
    assert cpu_decode_attention.amx_tiles()
    for heads, kv_heads, dim, block_size, dtype in [
        (9, 3, 64, 16, torch.float8_e5m2),
        (9, 3, 64, 24, torch.bfloat16),
        (32, 8, 64, 16, torch.bfloat16),
        (8, 1, 128, 32, torch.bfloat16),
    ]:
        assert not cpu_decode_attention.multiplies_on_tiles(heads, kv_heads, dim, block_size, dtype)
    monkeypatch.setenv(cpu_decode_attention.ITEMS_VARIABLE, "kv-head")
    assert not cpu_decode_attention.multiplies_on_tiles(9, 3, 64, 16)
    monkeypatch.setenv(cpu_decode_attention.ITEMS_VARIABLE, "sequence")
    monkeypatch.setenv(cpu_decode_attention.AMX_VARIABLE, "0")
    assert not cpu_decode_attention.amx_tiles()
    assert not cpu_decode_attention.multiplies_on_tiles(9, 3, 64, 16)
