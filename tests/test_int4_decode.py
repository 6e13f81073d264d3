"""int4 decode copies: exact for weights on a 4-bit grid, refused for others, parity end to end."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hawker import LLM
from hawker.layers.quant import INT4_GROUP_SIZE, quantize_int4
from tests.test_parity import assert_parity, make_prompts, reference_generate, run_hawker


def grid_weight(out_features: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """Q4_1-shaped values: per group of 32, scale * q + min with q in 0..15 (0 and 15 both used)."""
    groups = in_features // INT4_GROUP_SIZE
    codes = torch.randint(0, 16, (out_features, groups, INT4_GROUP_SIZE), generator=generator).float()
    codes[..., 0], codes[..., 1] = 0, 15
    scale = torch.rand(out_features, groups, 1, generator=generator) * 0.02 + 0.001
    low = -torch.rand(out_features, groups, 1, generator=generator) * 0.1
    return (codes * scale + low).view(out_features, in_features)


def snap_to_grid(weight: torch.Tensor) -> torch.Tensor:
    """The nearest Q4_1-style value of every weight (min/max per group of 32)."""
    out_features, in_features = weight.shape
    groups = weight.float().view(out_features, in_features // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
    low = groups.amin(-1, keepdim=True)
    scale = (groups.amax(-1, keepdim=True) - low) / 15
    return (((groups - low) / scale).round() * scale + low).view(out_features, in_features)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_int4_copy_of_a_grid_weight_is_exact_in_float32(rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    weight = grid_weight(96, 128, generator)
    int4 = quantize_int4(weight, max_rows=8)
    assert int4 is not None
    x = torch.randn(rows, 128, generator=generator)
    expected = x.double() @ weight.double().t()
    got = int4.matmul(x).double()
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    assert int4.applies_to(x) and not int4.applies_to(torch.randn(9, 128))


def test_grid_weight_rounded_to_bfloat16_still_qualifies() -> None:
    weight = grid_weight(64, 64, torch.Generator().manual_seed(5)).to(torch.bfloat16)
    assert quantize_int4(weight, max_rows=4) is not None


@pytest.mark.parametrize("levels", [256, None])
def test_finer_weights_are_refused(levels: int | None) -> None:
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(64, 64, generator=generator)
    if levels is not None:  # Q8_0-like: 256 levels per group
        scale = weight.abs().amax() / (levels // 2 - 1)
        weight = (weight / scale).round() * scale
    assert quantize_int4(weight, max_rows=4) is None


@pytest.fixture(scope="module")
def grid_checkpoint(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with every 2-D projection and the (tied) embedding snapped to a 4-bit grid."""
    source = tiny_checkpoints["llama"]
    target = tmp_path_factory.mktemp("int4") / "llama"
    shutil.copytree(source, target)
    (path,) = target.glob("*.safetensors")
    tensors = load_file(path)
    snapped = {
        name: snap_to_grid(t) if t.dim() == 2 and t.shape[1] % INT4_GROUP_SIZE == 0 else t
        for name, t in tensors.items()
    }
    save_file(snapped, path, metadata={"format": "pt"})
    return target


def test_int4_decode_keeps_parity_with_transformers(grid_checkpoint: Path) -> None:
    prompts = make_prompts(seed=3)
    reference = reference_generate(grid_checkpoint, prompts)
    llm = LLM(str(grid_checkpoint), dtype="float32", int4_decode_max_rows=8)
    model = llm.engine.runner.model
    quantized = [name for name, module in model.named_modules() if getattr(module, "int4", None) is not None]
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
