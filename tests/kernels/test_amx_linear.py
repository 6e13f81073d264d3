"""The AMX kernel (bfloat16 weights, tile multiplies, float32 sums): error within float32 summation bounds,
each row's bits independent of the batch and its place in it, weight refresh, compiled graphs, a bf16 model
as accurate as with dense weights, the off switch, and SwiGLU's product and activation in one pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hawker import LLM
from hawker.config import MatmulOptions
from hawker.kernels import amx_linear, rowwise
from hawker.layers.matmul_plan import allowed_kernels, rows_invariant
from hawker.layers.weight_copies import AMX, AmxWeight, build_copy
from tests.support.matmul import assert_bf16_model_on_copy_is_as_accurate, count_calls, prompt_logprobs
from tests.support.parity import make_prompts

needs_kernel = pytest.mark.skipif(not amx_linear.available(), reason="the CPU has no AMX (or no C compiler)")


def error_bound(x: torch.Tensor, weight: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """float32 sums of K products (each exact) err by at most K * 2^-24 * sum |x w|; the result is then
    rounded once to bfloat16 (half a unit in the last of its 8 bits)."""
    magnitude = x.double().abs() @ weight.double().abs().t()
    return x.shape[1] * 2.0**-24 * magnitude + exact.abs() * 2.0**-8


@needs_kernel
@pytest.mark.parametrize(("out_features", "in_features"), [(96, 64), (50, 128), (33, 32), (7, 576)])
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 33, 130, 300])
def test_products_are_float32_sums_rounded_once(out_features: int, in_features: int, rows: int) -> None:
    # Row counts across the 16-row tiles, the 32-row groups and the 128-row blocks; outputs across the panels.
    generator = torch.Generator().manual_seed(out_features * 1000 + rows)
    weight = torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)
    x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
    got = amx_linear.amx_linear(x, amx_linear.pack(weight), out_features)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    exact = x.double() @ weight.double().t()
    assert bool(((got.double() - exact).abs() <= error_bound(x, weight, exact)).all())


@needs_kernel
def test_a_rows_bits_do_not_depend_on_the_other_rows_or_its_place() -> None:
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(200, 192, generator=generator).to(torch.bfloat16)
    packed = amx_linear.pack(weight)
    x = torch.randn(300, 192, generator=generator).to(torch.bfloat16)
    alone = torch.cat([amx_linear.amx_linear(x[row : row + 1], packed, 200) for row in range(300)])
    for first, rows in ((0, 2), (0, 16), (5, 31), (0, 129), (77, 223), (0, 300)):
        assert torch.equal(amx_linear.amx_linear(x[first : first + rows], packed, 200), alone[first : first + rows])
    strided = torch.randn(300, 400, generator=generator).to(torch.bfloat16)
    strided[:, :192] = x  # rows with a stride: the kernel reads each row where it is
    assert torch.equal(amx_linear.amx_linear(strided[:, :192], packed, 200), alone)
    # The plan's own probe, which lets consistent numerics use the copy untiled.
    copy = build_copy(AMX, weight)
    assert copy is not None and rows_invariant(copy, x, [1, 17, 40, 128, 300])


@needs_kernel
def test_refresh_rewrites_the_panels_in_place() -> None:
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(64, 64, generator=generator).to(torch.bfloat16)
    copy = build_copy(AMX, weight)
    assert copy is not None
    held = copy.panel
    new_weight = torch.randn(64, 64, generator=generator).to(torch.bfloat16)
    copy.refresh(new_weight)
    assert copy.panel is held
    x = torch.randn(5, 64, generator=generator).to(torch.bfloat16)
    fresh = build_copy(AMX, new_weight)
    assert fresh is not None and torch.equal(copy.matmul(x), fresh.matmul(x))


@needs_kernel
def test_a_compiled_graph_calls_the_kernel_as_one_operator() -> None:
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(48, 64, generator=generator).to(torch.bfloat16)
    copy = build_copy(AMX, weight)
    assert copy is not None

    def step(x: torch.Tensor) -> torch.Tensor:
        return copy.matmul(x + 1)

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(disable=False):  # conftest turns torch.compile off for the suite
        for rows in (3, 20):
            x = torch.randn(rows, 64, generator=generator).to(torch.bfloat16)
            assert torch.equal(compiled(x), step(x))


def test_weights_it_cannot_take_and_the_off_switch() -> None:
    assert not amx_linear.supports(torch.zeros(8, 48, dtype=torch.bfloat16))  # inputs not in steps of 32
    assert not amx_linear.supports(torch.zeros(8, 64, dtype=torch.float32))
    assert AMX not in allowed_kernels(torch.bfloat16, MatmulOptions(amx=False))
    assert AMX not in allowed_kernels(torch.float16, MatmulOptions())
    if amx_linear.available():
        assert AMX in allowed_kernels(torch.bfloat16, MatmulOptions())
    else:
        with pytest.raises(ValueError, match="amx_matmul"):
            LLM(dtype="bfloat16", amx_matmul=True)
    with pytest.raises(ValueError, match="amx_matmul"):
        LLM(dtype="float32", amx_matmul=True)


@needs_kernel
def test_bf16_model_on_amx_tiles_is_as_accurate(
    tiny_checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert_bf16_model_on_copy_is_as_accurate(str(tiny_checkpoints["llama"]), AMX, AmxWeight, 13, monkeypatch)


@needs_kernel
@pytest.mark.parametrize(("out_features", "in_features"), [(128, 64), (192, 96), (3072, 576)])
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 33, 130, 300, 600])
def test_swiglu_in_one_pass_gives_the_bits_of_the_product_then_silu(
    out_features: int, in_features: int, rows: int
) -> None:
    """The fused [gate | up] product and SiLU-and-multiply: the bits of amx_linear followed by the row-wise
    silu_and_mul, across tiles, groups, blocks and panels, rows read in place at a stride."""
    generator = torch.Generator().manual_seed(out_features + rows)
    weight = (torch.randn(out_features, in_features, generator=generator) / 4).to(torch.bfloat16)
    wide = (torch.randn(rows, in_features + 32, generator=generator) * 2).to(torch.bfloat16)
    x = wide[:, :in_features]
    packed = amx_linear.pack(weight)
    assert amx_linear.fuses_silu_mul(x, out_features)
    expected = rowwise.silu_and_mul(amx_linear.amx_linear(x, packed, out_features))
    assert torch.equal(amx_linear.silu_mul(x, packed, out_features), expected)


@needs_kernel
def test_a_bf16_model_takes_the_fused_swiglu_with_the_same_bits(
    tiny_checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eager prompt steps whose gate | up projection multiplies on AMX tiles fuse the SiLU into it: the same
    prompt logprobs bit for bit as with the fusion off (HAWKER_FUSED_SWIGLU=0), and the fused kernel ran."""
    from hawker.layers.matmul_plan import ANY_ROWS, LayerPlan, PlanStep
    from hawker.layers.projection import FUSED_SWIGLU_VARIABLE, ProjectionCopies

    prompts = make_prompts(seed=21)
    llm = LLM(str(tiny_checkpoints["llama"]), dtype="bfloat16", compile_decode_max_rows=0)
    for layer in [m for m in llm.engine.runner.model.modules() if isinstance(m, ProjectionCopies)]:
        layer.set_plan(LayerPlan((PlanStep(ANY_ROWS, AMX),)), {})
    calls = count_calls(monkeypatch, amx_linear, "silu_mul")
    fused = prompt_logprobs(llm, prompts)
    assert calls() > 0
    monkeypatch.setenv(FUSED_SWIGLU_VARIABLE, "0")
    before = calls()
    unfused = prompt_logprobs(llm, prompts)
    assert calls() == before
    assert torch.equal(fused, unfused)
