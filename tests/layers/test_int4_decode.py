"""int4 decode copies: exact for weights on a 4-bit (or 8-bit) grid, refused for others, parity end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hawker import LLM
from hawker.layers.quant import Int8PairWeight, quantize_int4, quantize_int8_as_int4_pair
from tests.support.matmul import grid_weight, snap_to_q8_grid
from tests.support.parity import assert_parity, make_prompts, reference_generate, run_hawker
from tests.support.tiny_models import rewritten_copy


@pytest.mark.parametrize("rows", [1, 3])
def test_q8_copy_as_two_int4_halves_is_exact_in_float32(rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    weight = snap_to_q8_grid(torch.randn(96, 128, generator=generator))
    pair = quantize_int8_as_int4_pair(weight)
    assert pair is not None
    x = torch.randn(rows, 128, generator=generator)
    expected = x.double() @ weight.double().t()
    assert (pair.matmul(x).double() - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_q8_grid_rounded_to_bfloat16_qualifies_and_unquantized_weights_do_not() -> None:
    weight = snap_to_q8_grid(torch.randn(256, 256, generator=torch.Generator().manual_seed(2)))
    assert quantize_int8_as_int4_pair(weight.to(torch.bfloat16)) is not None
    unquantized = torch.randn(256, 256, generator=torch.Generator().manual_seed(3))
    assert quantize_int8_as_int4_pair(unquantized.to(torch.bfloat16)) is None
    assert quantize_int8_as_int4_pair(unquantized) is None


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_int4_copy_of_a_grid_weight_is_exact_in_float32(rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    weight = grid_weight(96, 128, generator)
    int4 = quantize_int4(weight)
    assert int4 is not None
    x = torch.randn(rows, 128, generator=generator)
    expected = x.double() @ weight.double().t()
    got = int4.matmul(x).double()
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_grid_weight_rounded_to_bfloat16_still_qualifies() -> None:
    weight = grid_weight(64, 64, torch.Generator().manual_seed(5)).to(torch.bfloat16)
    assert quantize_int4(weight) is not None


@pytest.mark.parametrize("levels", [256, None])
def test_finer_weights_are_refused(levels: int | None) -> None:
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(64, 64, generator=generator)
    if levels is not None:  # Q8_0-like: 256 levels per group
        scale = weight.abs().amax() / (levels // 2 - 1)
        weight = (weight / scale).round() * scale
    assert quantize_int4(weight) is None


def test_int4_decode_keeps_parity_with_transformers(grid_checkpoint: Path) -> None:
    prompts = make_prompts(seed=3)
    reference = reference_generate(grid_checkpoint, prompts)
    llm = LLM(str(grid_checkpoint), dtype="float32", int4_decode_max_rows=8)
    model = llm.engine.runner.model
    quantized = [name for name, module in model.named_modules() if getattr(module, "quantized_copy", False)]
    assert len(quantized) == 4 * model.config.num_layers + 1  # qkv, o, gate_up, down per layer + LM head
    calls = 0
    original = torch.ops.aten._weight_int4pack_mm_for_cpu

    def counting(*args):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return original(*args)

    torch.ops.aten._weight_int4pack_mm_for_cpu = counting  # type: ignore[assignment]
    try:
        tokens, logits = run_hawker(llm, prompts)
    finally:
        torch.ops.aten._weight_int4pack_mm_for_cpu = original  # type: ignore[assignment]
    assert calls > 0  # the 8-row decode steps went through the int4 kernel
    assert_parity(reference, tokens, logits)


def test_int4_decode_option_is_validated() -> None:
    with pytest.raises(ValueError, match="int4_decode_max_rows"):
        LLM(dtype="float32", int4_decode_max_rows=-1)


@pytest.fixture(scope="module")
def q8_head_checkpoint(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with its embedding and LM head on Q8_0's grid; other weights unquantized."""

    def snap(name: str, tensor: torch.Tensor) -> torch.Tensor:  # the LM head is absent when tied
        return snap_to_q8_grid(tensor) if name in ("model.embed_tokens.weight", "lm_head.weight") else tensor

    return rewritten_copy(tiny_checkpoints["llama"], tmp_path_factory.mktemp("q8") / "llama", snap)


def test_q8_lm_head_as_int4_halves_keeps_parity_with_transformers(q8_head_checkpoint: Path) -> None:
    prompts = make_prompts(seed=4)[:3]  # three sequences: decode steps within the pair's 4 rows
    reference = reference_generate(q8_head_checkpoint, prompts)
    # The 8-bit pair belongs to the size-tuned plans (consistent numerics gives the LM head one copy).
    llm = LLM(str(q8_head_checkpoint), dtype="float32", int4_decode_max_rows=8, consistent_numerics=False)
    modules = llm.engine.runner.model.named_modules()
    copies = {name: m.copies.get("int8pair") for name, m in modules if getattr(m, "quantized_copy", False)}
    assert list(copies) == ["lm_head"] and isinstance(copies["lm_head"], Int8PairWeight)
    tokens, logits = run_hawker(llm, prompts)
    assert_parity(reference, tokens, logits)
