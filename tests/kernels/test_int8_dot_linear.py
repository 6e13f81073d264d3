"""The int8 dot kernel (4/8-bit weight codes, activations quantised to 8 bits per group of 32): exact integer
sums against a reference, each row's bits independent of the batch, copies only of weights on a grid,
compiled graphs, the options, and a bf16 model's accuracy against float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hawker import LLM
from hawker.config import MatmulOptions
from hawker.kernels import int8_dot_linear
from hawker.layers.matmul_plan import ANY_ROWS, LayerPlan, PlanStep, allowed_kernels
from hawker.layers.projection import ProjectionCopies
from hawker.layers.weight_copies import BUILDERS, INT8DOT, IntDotWeight, build_copy
from tests.support.matmul import count_calls, grid_weight, prompt_logprobs, snap_to_q8_grid
from tests.support.parity import make_prompts
from tests.support.tiny_models import rewritten_copy, snap_to_grid

needs_kernel = pytest.mark.skipif(not int8_dot_linear.available(), reason="the CPU has no AVX512-VNNI")


def random_codes(out_features: int, in_features: int, bits: int, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=generator)
    scale = torch.rand(out_features, in_features // 32, generator=generator) * 0.02 + 1e-3
    offset = -torch.rand(out_features, in_features // 32, generator=generator) * 0.1
    return codes, scale, offset


def reference(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, in float64: each row's groups of 32 rounded to steps of max |x| / 127 (the
    step and its inverse in float32, as the kernel takes them), times the weights with float16 scales."""
    rows, in_features = x.shape
    groups = x.float().view(rows, in_features // 32, 32)
    step = groups.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(step > 0, 1 / step, torch.zeros_like(step))
    quantised = (torch.round(groups * inverse) * step).view(rows, in_features)
    scale, offset = (values.half().double().repeat_interleave(32, dim=1) for values in (scale, offset))
    weight = codes.double() * scale + offset
    return quantised.double() @ weight.t()


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("out_features", "in_features"), [(64, 64), (50, 96), (7, 576), (33, 1536)])
@pytest.mark.parametrize("rows", [1, 5, 8, 9, 23, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_are_the_quantised_rows_times_the_codes(
    bits: int, out_features: int, in_features: int, rows: int, dtype: torch.dtype
) -> None:
    codes, scale, offset = random_codes(out_features, in_features, bits, seed=out_features + rows + bits)
    packed = int8_dot_linear.pack(codes, scale, offset, bits)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).to(dtype)
    got = int8_dot_linear.int8_dot_linear(x, packed, bits, out_features)
    assert got.dtype == dtype and got.shape == (rows, out_features)
    expected = reference(x, codes, scale, offset)
    # Integer sums are exact; float32 adds one rounding per group (and bfloat16 one at the end).
    magnitude = x.double().abs() @ (codes.double() * 0.03 + 0.1).t()
    tolerance = (in_features // 32 + 2) * 2.0**-24 * magnitude + (
        expected.abs() * 2.0**-8 if dtype != torch.float32 else 0
    )
    assert bool(((got.double() - expected).abs() <= tolerance).all())


@needs_kernel
def test_a_rows_bits_do_not_depend_on_the_other_rows() -> None:
    codes, scale, offset = random_codes(200, 192, 4, seed=3)
    packed = int8_dot_linear.pack(codes, scale, offset, 4)
    x = torch.randn(300, 192, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    alone = torch.cat([int8_dot_linear.int8_dot_linear(x[row : row + 1], packed, 4, 200) for row in range(300)])
    for rows in (2, 8, 9, 21, 257, 300):  # one chunk, across chunks and across blocks of 256 rows
        assert torch.equal(int8_dot_linear.int8_dot_linear(x[:rows], packed, 4, 200), alone[:rows])
    wide = torch.randn(300, 400, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    wide[:, :192] = x  # rows with a stride: the kernel reads each row where it is
    assert torch.equal(int8_dot_linear.int8_dot_linear(wide[:, :192], packed, 4, 200), alone)


@needs_kernel
def test_zero_rows_and_zero_groups() -> None:
    codes, scale, offset = random_codes(16, 64, 8, seed=5)
    packed = int8_dot_linear.pack(codes, scale, offset, 8)
    assert int8_dot_linear.int8_dot_linear(torch.zeros(0, 64), packed, 8, 16).shape == (0, 16)
    assert torch.equal(int8_dot_linear.int8_dot_linear(torch.zeros(2, 64), packed, 8, 16), torch.zeros(2, 16))


@needs_kernel
def test_copies_only_of_weights_on_a_grid() -> None:
    generator = torch.Generator().manual_seed(6)
    q4 = grid_weight(48, 64, generator)
    q8 = snap_to_q8_grid(torch.randn(48, 64, generator=generator)).to(torch.bfloat16)
    copy4, copy8 = build_copy(INT8DOT, q4), build_copy(INT8DOT, q8)
    assert copy4 is not None and copy4.bits == 4
    assert copy8 is not None and copy8.bits == 8
    assert build_copy(INT8DOT, torch.randn(48, 64, generator=generator).to(torch.bfloat16)) is None
    assert build_copy(INT8DOT, q4[:, :48]) is None  # inputs not a whole number of groups
    assert build_copy(INT8DOT, q8 * 2.0**-20) is None  # scales below float16's range
    x = torch.randn(3, 64, generator=generator).to(torch.bfloat16)
    for copy, weight in ((copy4, q4), (copy8, q8)):
        exact = x.double() @ weight.double().t()
        error = (copy.matmul(x).double() - exact).abs().max() / exact.abs().max()
        assert error < 0.02  # the activations' 8-bit rounding (and bfloat16's), nothing more
        with pytest.raises(ValueError, match="cannot be written"):
            copy.refresh(weight)


@needs_kernel
def test_a_compiled_graph_calls_the_kernel_as_one_operator() -> None:
    generator = torch.Generator().manual_seed(7)
    copy = BUILDERS[INT8DOT](grid_weight(48, 64, generator))
    assert copy is not None

    def step(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(copy.matmul(x + 1))

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(disable=False):  # conftest turns torch.compile off for the suite
        for rows in (3, 7):
            x = torch.randn(rows, 64, generator=generator).to(torch.bfloat16)
            assert torch.equal(compiled(x), step(x))


def test_bad_inputs_are_refused() -> None:
    codes, scale, offset = random_codes(16, 64, 4, seed=8)
    with pytest.raises(ValueError, match="bits"):
        int8_dot_linear.pack(codes, scale, offset, 3)
    with pytest.raises(ValueError, match="multiple of 32"):
        int8_dot_linear.pack(codes[:, :48], scale, offset, 4)
    if int8_dot_linear.available():
        packed = int8_dot_linear.pack(codes, scale, offset, 4)
        with pytest.raises(ValueError, match="inputs"):
            int8_dot_linear.int8_dot_linear(torch.zeros(2, 32), packed, 4, 16)
        with pytest.raises(ValueError, match="float16"):
            int8_dot_linear.int8_dot_linear(torch.zeros(2, 64, dtype=torch.float16), packed, 4, 16)


def test_options_and_the_off_switch() -> None:
    assert INT8DOT not in allowed_kernels(torch.bfloat16, MatmulOptions(int8_dot=False))
    assert INT8DOT not in allowed_kernels(torch.float32, MatmulOptions())  # float32 asked for more precision
    assert INT8DOT not in allowed_kernels(torch.float16, MatmulOptions(int8_dot=True))
    if int8_dot_linear.available():
        assert INT8DOT in allowed_kernels(torch.bfloat16, MatmulOptions())
        assert INT8DOT in allowed_kernels(torch.float32, MatmulOptions(int8_dot=True))
    with pytest.raises(ValueError, match="int8_dot_matmul"):
        LLM(dtype="float16", int8_dot_matmul=True)


@pytest.fixture(scope="module")
def gguf_like_checkpoint(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama laid out like the default GGUF: projections on Q4_1's grid, the embedding on Q8_0's."""

    def snap(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() != 2 or tensor.shape[1] % 32:
            return tensor
        return snap_to_q8_grid(tensor) if "embed_tokens" in name or "lm_head" in name else snap_to_grid(tensor)

    return rewritten_copy(tiny_checkpoints["llama"], tmp_path_factory.mktemp("q4q8") / "llama", snap)


@needs_kernel
def test_bf16_model_through_int8_dots_stays_close_to_float32(
    gguf_like_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompt logprobs of the bf16 model with every projection and the LM head on the int8 dot kernel,
    against the float32 model: the activations' 8-bit rounding adds error of the size of bf16's own."""
    checkpoint = str(gguf_like_checkpoint)
    prompts = make_prompts(seed=13)
    reference_values = prompt_logprobs(LLM(checkpoint, dtype="float32"), prompts)
    dense = prompt_logprobs(LLM(checkpoint, dtype="bfloat16", int8_dot_matmul=False), prompts)
    llm = LLM(checkpoint, dtype="bfloat16", compile_decode_max_rows=0)
    projections = [m for m in llm.engine.runner.model.modules() if isinstance(m, ProjectionCopies)]
    for layer in projections:
        layer.set_plan(LayerPlan((PlanStep(ANY_ROWS, INT8DOT),)), {})
    bits = sorted({layer.copies[INT8DOT].bits for layer in projections})  # type: ignore[attr-defined]
    assert bits == [4, 8]  # the projections' 4-bit codes and the head's 8-bit ones
    calls = count_calls(monkeypatch, IntDotWeight, "matmul")
    quantised = prompt_logprobs(llm, prompts)
    assert calls() >= len(projections)
    dense_error = (dense - reference_values).abs().max().item()
    int8_error = (quantised - reference_values).abs().max().item()
    print(f"bf16 dense {dense_error:.4f}, int8 dot {int8_error:.4f}")
    assert int8_error <= 3 * dense_error + 1e-3, (int8_error, dense_error)


@needs_kernel
def test_weight_updates_are_refused_through_codes_and_taken_with_the_switches_off(
    gguf_like_checkpoint: Path,
) -> None:
    """New values cannot be written into 4/8-bit codes: the update is refused (naming the switches) and
    changes nothing; with the quantised copies off the same update is taken."""
    checkpoint = str(gguf_like_checkpoint)
    name = "model.layers.0.mlp.down_proj.weight"
    llm = LLM(checkpoint, dtype="bfloat16", compile_decode_max_rows=0)
    layer = llm.engine.runner.model.model.layers[0].mlp.down_proj
    layer.set_plan(LayerPlan((PlanStep(ANY_ROWS, INT8DOT),)), {})
    update = torch.zeros_like(layer.weight)
    with pytest.raises(ValueError, match="int8_dot_matmul=False"):
        llm.update_weights([(name, update)])
    assert llm.weight_version == 0 and not bool((layer.weight == 0).all())
    plain = LLM(checkpoint, dtype="bfloat16", int8_dot_matmul=False, int4_decode_max_rows=0, amx_q4_matmul=False)
    assert plain.update_weights([(name, update)]) == 1


@needs_kernel
def test_the_operator_kernel_matches_the_ctypes_one() -> None:
    """The operator's kernel (C++ where it builds) and the ctypes wrapper give the same bits, strided rows too."""
    codes, scale, offset = random_codes(40, 96, 4, seed=11)
    packed = int8_dot_linear.pack(codes, scale, offset, 4)
    generator = torch.Generator().manual_seed(12)
    wide = torch.randn(5, 192, generator=generator).to(torch.bfloat16)
    for x in (wide[:, :96], wide[:, :96].contiguous(), wide[:, :96].float(), wide[:0, :96]):
        assert torch.equal(int8_dot_linear.int8_dot_linear(x, packed, 4, 40), int8_dot_linear._run(x, packed, 4, 40))
