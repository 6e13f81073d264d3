"""float32 copies for many-row steps: the row threshold picks the path; bf16 models stay as accurate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hawker import LLM
from hawker.config import MatmulOptions
from hawker.layers.linear import ColumnParallelLinear
from hawker.layers.parallel import TPInfo
from hawker.layers.projection import plan_projections
from hawker.layers.weight_copies import Fp32Weight
from tests.support.matmul import count_calls, prompt_logprobs
from tests.support.parity import make_prompts


def bf16_layer(generator: torch.Generator) -> ColumnParallelLinear:
    layer = ColumnParallelLinear(64, [48], bias=True, tp=TPInfo(0, 1), dtype=torch.bfloat16)
    layer.load("weight", torch.randn(48, 64, generator=generator))
    layer.load("bias", torch.randn(48, generator=generator))
    return layer


@pytest.mark.parametrize("rows", [3, 4, 9])
def test_row_threshold_picks_the_path(rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    layer = bf16_layer(generator)
    plan_projections(layer, MatmulOptions(fp32_min_rows=4, int4_max_rows=0, packed=False, panel=False, amx=False))
    assert layer.plan is not None and layer.plan.change_rows == [4]
    x = torch.randn(rows, 64, generator=generator).to(torch.bfloat16)
    got = layer(x)
    assert got.dtype == torch.bfloat16
    if rows >= 4:  # widened exactly, one float32 product, rounded once; then the bias
        expected = F.linear(x.float(), layer.weight.float()).to(torch.bfloat16) + layer.bias
    else:
        expected = F.linear(x, layer.weight) + layer.bias
    assert torch.equal(got, expected)


def test_float32_weights_get_no_copy() -> None:
    layer = ColumnParallelLinear(64, [48], bias=False, tp=TPInfo(0, 1), dtype=torch.float32)
    plan_projections(layer, MatmulOptions(fp32_min_rows=4, packed=False))
    assert layer.plan is not None and "fp32" not in layer.copies


def test_bf16_model_with_fp32_copies_is_as_accurate(
    tiny_checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompt logprobs of a bf16 model, with and without float32 copies, against float32."""
    checkpoint = str(tiny_checkpoints["llama"])
    prompts = make_prompts(seed=11)
    reference = prompt_logprobs(LLM(checkpoint, dtype="float32"), prompts)
    dense = prompt_logprobs(
        LLM(checkpoint, dtype="bfloat16", fp32_matmul_min_rows=0, panel_matmul=False, amx_matmul=False), prompts
    )

    calls = count_calls(monkeypatch, Fp32Weight, "matmul")
    wide = prompt_logprobs(LLM(checkpoint, dtype="bfloat16", fp32_matmul_min_rows=16), prompts)
    assert calls() > 0
    dense_error = (dense - reference).abs().max().item()
    wide_error = (wide - reference).abs().max().item()
    # Both are bf16 models; the float32 copies change rounding order only, so
    # their error is bf16-sized and no larger than the dense path's (with slack).
    assert wide_error <= 1.5 * dense_error + 1e-3, (wide_error, dense_error)


def test_fp32_matmul_option_is_validated() -> None:
    with pytest.raises(ValueError, match="fp32_matmul_min_rows"):
        LLM(dtype="bfloat16", fp32_matmul_min_rows=-1)
