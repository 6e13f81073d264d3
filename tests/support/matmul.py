"""Helpers of the matmul tests: weights on GGUF's grids, call counting, prompt logprobs, a bf16 model on one
copy against dense weights, a two-projection model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from hawker import LLM, SamplingParams
from hawker.layers.linear import ColumnParallelLinear
from hawker.layers.parallel import TPInfo
from hawker.layers.quant import INT4_GROUP_SIZE


def prompt_logprobs(llm: LLM, prompts: list[list[int]]) -> torch.Tensor:
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    values = []
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.prompt_logprobs is not None
        for token, position in zip(prompt[1:], output.prompt_logprobs[1:], strict=True):
            assert position is not None
            values.append(position[token].logprob)
    return torch.tensor(values, dtype=torch.float64)


def assert_bf16_model_on_copy_is_as_accurate(
    checkpoint: str, kernel: str, copy_type: type, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompt logprobs of a bf16 model with every projection on ``kernel``'s copy (of ``copy_type``), against
    float32, no worse than the dense bf16 path (both are bf16 models; the copy changes the order of the sums)."""
    from hawker.layers.matmul_plan import ANY_ROWS, LayerPlan, PlanStep
    from hawker.layers.projection import ProjectionCopies
    from tests.support.parity import make_prompts

    prompts = make_prompts(seed=seed)
    reference = prompt_logprobs(LLM(checkpoint, dtype="float32"), prompts)
    dense = prompt_logprobs(
        LLM(checkpoint, dtype="bfloat16", fp32_matmul_min_rows=0, panel_matmul=False, amx_matmul=False), prompts
    )
    llm = LLM(checkpoint, dtype="bfloat16", compile_decode_max_rows=0)
    projections = [m for m in llm.engine.runner.model.modules() if isinstance(m, ProjectionCopies)]
    for layer in projections:
        layer.set_plan(LayerPlan((PlanStep(ANY_ROWS, kernel),)), {})
    calls = count_calls(monkeypatch, copy_type, "matmul")
    on_copy = prompt_logprobs(llm, prompts)
    assert calls() >= len(projections)
    dense_error = (dense - reference).abs().max().item()
    copy_error = (on_copy - reference).abs().max().item()
    assert copy_error <= 1.5 * dense_error + 1e-3, (copy_error, dense_error)


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> Callable[[], int]:
    """Count the calls of ``owner.name`` from now on; the returned function reads the count."""
    calls = 0
    original = getattr(owner, name)

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return lambda: calls


def grid_weight(out_features: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """Q4_1-shaped values: per group of 32, scale * q + min with q in 0..15 (0 and 15 both used)."""
    groups = in_features // INT4_GROUP_SIZE
    codes = torch.randint(0, 16, (out_features, groups, INT4_GROUP_SIZE), generator=generator).float()
    codes[..., 0], codes[..., 1] = 0, 15
    scale = torch.rand(out_features, groups, 1, generator=generator) * 0.02 + 0.001
    low = -torch.rand(out_features, groups, 1, generator=generator) * 0.1
    return (codes * scale + low).view(out_features, in_features)


def snap_to_q8_grid(weight: torch.Tensor) -> torch.Tensor:
    """GGUF Q8_0's value of every weight: per group of 32, d * code with d = max |w| / 127."""
    out_features, in_features = weight.shape
    groups = weight.float().view(out_features, in_features // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
    scale = groups.abs().amax(-1, keepdim=True) / 127
    return ((groups / scale).round() * scale).view(out_features, in_features)


class TwoProjections(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from hawker.layers.linear import RowParallelLinear

        self.up = ColumnParallelLinear(64, [96], bias=False, tp=TPInfo(0, 1), dtype=torch.bfloat16)
        self.down = RowParallelLinear(96, 64, bias=False, tp=TPInfo(0, 1), dtype=torch.bfloat16)
        generator = torch.Generator().manual_seed(3)
        self.up.load("weight", torch.randn(96, 64, generator=generator))
        self.down.load("weight", torch.randn(64, 96, generator=generator))
