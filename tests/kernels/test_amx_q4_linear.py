"""The AMX kernel over 4-bit weights (GGUF Q4_1's grid, dequantised into bfloat16 tiles inside the matmul):
the grid found from a weight gives back its very values or is refused, the products and the fused SwiGLU
have the bfloat16 AMX kernel's bits at every shape and row count (one block, blocks, the whole weight
dequantised once), the operator, compiled graphs, a model on it with the same prompt logprobs, and the
off switch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from hawker import LLM
from hawker.config import MatmulOptions
from hawker.kernels import amx_linear
from hawker.layers.matmul_plan import ANY_ROWS, LayerPlan, PlanStep, allowed_kernels
from hawker.layers.projection import ProjectionCopies
from hawker.layers.quant import INT4_GROUP_SIZE, exact_float16_int4_grid
from hawker.layers.weight_copies import AMX, AMXQ4, AmxQ4Weight, build_copy
from hawker.loader.checkpoint import default_model_path
from hawker.loader.gguf import _dequantize, open_gguf
from tests.support.matmul import count_calls, prompt_logprobs
from tests.support.parity import make_prompts
from tests.support.tiny_models import rewritten_copy

needs_kernel = pytest.mark.skipif(not amx_linear.available(), reason="the CPU has no AMX (or no C compiler)")


def q4_weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    """A bfloat16 weight as GGUF's Q4_1 dequantises: float16 scale d and minimum m per group of 32, codes
    0..15 (the group's least and largest present), ``(d * q) + m`` in float32, rounded to bfloat16."""
    generator = torch.Generator().manual_seed(seed)
    groups = in_features // INT4_GROUP_SIZE
    codes = torch.randint(0, 16, (out_features, groups, INT4_GROUP_SIZE), generator=generator).float()
    codes[..., 0], codes[..., 1] = 0, 15
    scale = (torch.rand(out_features, groups, 1, generator=generator) * 0.02 + 1e-3).half().float()
    minimum = (-(torch.rand(out_features, groups, 1, generator=generator) + 7.5) * scale).half().float()
    return (scale * codes + minimum).view(out_features, in_features).to(torch.bfloat16)


def test_the_grid_gives_back_the_weight_or_is_refused() -> None:
    weight = q4_weight(64, 128, seed=1)
    grid = exact_float16_int4_grid(weight)
    assert grid is not None
    groups = grid.codes.view(64, -1, INT4_GROUP_SIZE)
    assert torch.equal((grid.scale * groups + grid.offset).to(torch.bfloat16).view(64, 128), weight)
    assert torch.equal(grid.scale, grid.scale.half().float()) and torch.equal(grid.offset, grid.offset.half().float())
    assert exact_float16_int4_grid(torch.randn(64, 128).to(torch.bfloat16)) is None  # not on a 4-bit grid
    nudged = weight.clone()
    nudged[3, 5] = (nudged[3, 5].view(torch.int16) + 1).view(torch.bfloat16)  # one bfloat16 step off its grid
    assert exact_float16_int4_grid(nudged) is None


def test_the_default_models_q4_1_weights_are_given_back_exactly() -> None:
    """Every Q4_1 tensor of the default GGUF's first block, dequantised as loading does and rounded to
    bfloat16, has an exact float16 grid (the copy is built from the weight alone, never re-quantised)."""
    gguf = open_gguf(default_model_path())
    tensors = [t for t in gguf.tensors if t.name.startswith("blk.0.") and t.kind == GGMLQuantizationType.Q4_1]
    assert len(tensors) == 7
    for tensor in tensors:
        weight = torch.from_numpy(np.array(_dequantize(gguf.tensor_data(tensor), tensor.kind))).to(torch.bfloat16)
        assert exact_float16_int4_grid(weight) is not None, tensor.name


@needs_kernel
@pytest.mark.parametrize(("out_features", "in_features"), [(96, 64), (50, 128), (33, 32), (576, 1536), (40, 2048)])
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 33, 130, 300, 600])
def test_products_have_the_bfloat16_kernels_bits(out_features: int, in_features: int, rows: int) -> None:
    """Panels dequantised beside the previous panel's tile multiplies, on demand, and (600 rows of 1,536 or
    2,048 inputs: more than one block) the whole weight at once; rows read in place at a stride."""
    weight = q4_weight(out_features, in_features, seed=out_features + in_features)
    q4, bf16 = build_copy(AMXQ4, weight), build_copy(AMX, weight)
    assert q4 is not None and bf16 is not None
    assert q4.nbytes() * 3 < bf16.nbytes()
    generator = torch.Generator().manual_seed(rows)
    wide = torch.randn(rows, in_features + 32, generator=generator).to(torch.bfloat16)
    x = wide[:, :in_features]
    assert torch.equal(q4.matmul(x), bf16.matmul(x))
    assert torch.equal(amx_linear._run_q4(x, q4.packed, out_features), bf16.matmul(x))  # the ctypes kernel


@needs_kernel
@pytest.mark.parametrize(("out_features", "in_features"), [(128, 64), (192, 96), (3072, 576), (128, 2048)])
@pytest.mark.parametrize("rows", [1, 17, 33, 300, 600])
def test_swiglu_in_one_pass_has_the_bfloat16_kernels_bits(out_features: int, in_features: int, rows: int) -> None:
    weight = q4_weight(out_features, in_features, seed=rows)
    q4, bf16 = build_copy(AMXQ4, weight), build_copy(AMX, weight)
    assert q4 is not None and bf16 is not None
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    assert torch.equal(
        amx_linear.q4_silu_mul(x, q4.packed, out_features), amx_linear.silu_mul(x, bf16.panel, out_features)
    )


@needs_kernel
def test_a_compiled_graph_calls_the_kernel_as_one_operator() -> None:
    copy = build_copy(AMXQ4, q4_weight(48, 64, seed=5))
    assert copy is not None

    def step(x: torch.Tensor) -> torch.Tensor:
        return copy.matmul(x + 1)

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    generator = torch.Generator().manual_seed(6)
    with torch._dynamo.config.patch(disable=False):  # conftest turns torch.compile off for the suite
        for rows in (3, 20):
            x = torch.randn(rows, 64, generator=generator).to(torch.bfloat16)
            assert torch.equal(compiled(x), step(x))


def test_weights_it_cannot_take_and_the_off_switch() -> None:
    assert build_copy(AMXQ4, torch.randn(64, 64).to(torch.bfloat16)) is None  # not on a grid
    assert build_copy(AMXQ4, q4_weight(64, 64, seed=2).float()) is None  # float32 weights: not the AMX kernel
    assert AMXQ4 not in allowed_kernels(torch.bfloat16, MatmulOptions(amx_q4=False))
    assert AMXQ4 not in allowed_kernels(torch.bfloat16, MatmulOptions(amx=False))
    assert AMXQ4 not in allowed_kernels(torch.float16, MatmulOptions())
    if amx_linear.available():
        assert AMXQ4 in allowed_kernels(torch.bfloat16, MatmulOptions())
    with pytest.raises(ValueError, match="amx_q4_matmul"):
        LLM(dtype="bfloat16", amx_q4_matmul=True, amx_matmul=False)
    with pytest.raises(ValueError, match="amx_q4_matmul"):
        LLM(dtype="float32", amx_q4_matmul=True)


@pytest.fixture(scope="module")
def float16_grid_checkpoint(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with every projection on a Q4_1 grid of float16 scales and minima."""

    def snap(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() != 2 or tensor.shape[1] % INT4_GROUP_SIZE or "embed" in name or "lm_head" in name:
            return tensor
        groups = tensor.float().view(tensor.shape[0], -1, INT4_GROUP_SIZE)
        low = groups.amin(-1, keepdim=True).half().float()
        scale = ((groups.amax(-1, keepdim=True) - low) / 15).half().float()
        codes = ((groups - low) / scale).round().clamp(0, 15)
        return (scale * codes + low).view(tensor.shape)

    return rewritten_copy(tiny_checkpoints["llama"], tmp_path_factory.mktemp("q4f16") / "llama", snap)


@needs_kernel
def test_a_model_on_4_bit_tiles_has_the_bfloat16_tiles_prompt_logprobs(
    float16_grid_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eager prompt steps with every projection on the 4-bit copy (the SwiGLU fused) give the prompt logprobs
    of the bfloat16 AMX copy bit for bit."""
    prompts = make_prompts(seed=31)
    llm = LLM(str(float16_grid_checkpoint), dtype="bfloat16", compile_decode_max_rows=0)
    layers = [m for m in llm.engine.runner.model.modules() if isinstance(m, ProjectionCopies) and m.weight.dim() == 2]
    layers = [layer for layer in layers if not hasattr(layer, "logits")]
    values = {}
    for kernel in (AMX, AMXQ4):
        for layer in layers:
            layer.set_plan(LayerPlan((PlanStep(ANY_ROWS, kernel),)), {})
        calls = count_calls(monkeypatch, AmxQ4Weight, "matmul")
        fused = count_calls(monkeypatch, amx_linear, "q4_silu_mul")
        values[kernel] = prompt_logprobs(llm, prompts)
        if kernel == AMXQ4:
            assert calls() > 0 and fused() > 0
    assert all(isinstance(layer.copies[AMXQ4], AmxQ4Weight) for layer in layers)
    assert torch.equal(values[AMX], values[AMXQ4])
