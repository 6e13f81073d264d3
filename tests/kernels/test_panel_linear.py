"""The panel kernel (bfloat16 weights, float32 sums): error within float32 summation bounds, each row's bits
independent of the batch, weight refresh, compiled graphs, and a bf16 model as accurate as with dense weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hawker import LLM
from hawker.config import MatmulOptions
from hawker.kernels import panel_linear
from hawker.layers.matmul_plan import allowed_kernels
from hawker.layers.weight_copies import BUILDERS, PACKED, PANEL, PanelWeight, build_copy
from tests.support.matmul import assert_bf16_model_on_copy_is_as_accurate

needs_kernel = pytest.mark.skipif(not panel_linear.available(), reason="the CPU has no AVX512-BF16")


def error_bound(x: torch.Tensor, weight: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Sequential float32 sums of K products (each exact) err by at most K * 2^-24 * sum |x w|; the result
    is then rounded once to bfloat16 (half a unit in the last of its 8 bits)."""
    magnitude = x.double().abs() @ weight.double().abs().t()
    return x.shape[1] * 2.0**-24 * magnitude + exact.abs() * 2.0**-8


@needs_kernel
@pytest.mark.parametrize(("out_features", "in_features"), [(96, 64), (50, 128), (33, 2), (7, 576)])
@pytest.mark.parametrize("rows", [1, 3, 10, 11, 23])
def test_products_are_float32_sums_rounded_once(out_features: int, in_features: int, rows: int) -> None:
    generator = torch.Generator().manual_seed(out_features * 1000 + rows)
    weight = torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)
    x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
    got = panel_linear.panel_linear(x, panel_linear.pack(weight), out_features)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    exact = x.double() @ weight.double().t()
    assert bool(((got.double() - exact).abs() <= error_bound(x, weight, exact)).all())


@needs_kernel
def test_a_rows_bits_do_not_depend_on_the_other_rows() -> None:
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(200, 192, generator=generator).to(torch.bfloat16)
    packed = panel_linear.pack(weight)
    x = torch.randn(37, 192, generator=generator).to(torch.bfloat16)
    alone = torch.cat([panel_linear.panel_linear(x[row : row + 1], packed, 200) for row in range(37)])
    for rows in (2, 9, 10, 21, 37):  # within one chunk of rows, across chunks, a partial last chunk
        assert torch.equal(panel_linear.panel_linear(x[:rows], packed, 200), alone[:rows])
    strided = torch.randn(37, 400, generator=generator).to(torch.bfloat16)
    strided[:, :192] = x  # rows with a stride: the kernel reads each row where it is
    assert torch.equal(panel_linear.panel_linear(strided[:, :192], packed, 200), alone)


@needs_kernel
def test_refresh_rewrites_the_panels_in_place() -> None:
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(64, 64, generator=generator).to(torch.bfloat16)
    copy = build_copy(PANEL, weight)
    assert copy is not None
    held = copy.panel
    new_weight = torch.randn(64, 64, generator=generator).to(torch.bfloat16)
    copy.refresh(new_weight)
    assert copy.panel is held
    x = torch.randn(5, 64, generator=generator).to(torch.bfloat16)
    fresh = build_copy(PANEL, new_weight)
    assert fresh is not None and torch.equal(copy.matmul(x), fresh.matmul(x))


@needs_kernel
def test_a_compiled_graph_calls_the_kernel_as_one_operator() -> None:
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(48, 64, generator=generator).to(torch.bfloat16)
    packed = panel_linear.pack(weight)

    def step(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(panel_linear.panel_linear(x * 2, packed, 48))

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(disable=False):  # conftest turns torch.compile off for the suite
        for rows in (3, 7):
            x = torch.randn(rows, 64, generator=generator).to(torch.bfloat16)
            assert torch.allclose(compiled(x).float(), step(x).float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("kernel", [PANEL, PACKED])
def test_copies_with_their_own_operators_run_inside_a_compiled_graph(kernel: str) -> None:
    """A compiled decode step calls these copies through hawker's operators (oneDNN's packed weight is an
    opaque tensor that dispatches on its own key)."""
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(48, 64, generator=generator).to(torch.bfloat16)
    copy = BUILDERS[kernel](weight)
    if copy is None:
        pytest.skip(f"no {kernel} copy on this CPU")

    def step(x: torch.Tensor) -> torch.Tensor:
        return copy.matmul(x + 1)

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(disable=False):
        x = torch.randn(5, 64, generator=generator).to(torch.bfloat16)
        assert torch.equal(compiled(x), step(x))


def test_weights_it_cannot_take_and_the_off_switch() -> None:
    assert not panel_linear.supports(torch.zeros(8, 7, dtype=torch.bfloat16))  # odd inputs
    assert not panel_linear.supports(torch.zeros(8, 8))  # float32
    assert PANEL not in allowed_kernels(torch.bfloat16, MatmulOptions(panel=False))
    assert PANEL not in allowed_kernels(torch.float16, MatmulOptions())
    if panel_linear.available():
        assert PANEL in allowed_kernels(torch.bfloat16, MatmulOptions())


@needs_kernel
def test_bf16_model_on_panels_is_as_accurate(
    tiny_checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert_bf16_model_on_copy_is_as_accurate(str(tiny_checkpoints["llama"]), PANEL, PanelWeight, 12, monkeypatch)


def test_panel_option_is_validated() -> None:
    with pytest.raises(ValueError, match="panel_matmul"):
        LLM(dtype="float32", panel_matmul=True)
