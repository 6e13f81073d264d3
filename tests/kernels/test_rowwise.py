"""The one-pass RMSNorm, SiLU-and-multiply and rotary kernels for eager bfloat16 CPU rows, against the torch
code in hawker/layers that they replace (same roundings: at most a last-bit difference, none for the
rotation), on rows of every length class, views with strides, and the off switch."""

from __future__ import annotations

import pytest
import torch

from hawker.config import RopeScaling
from hawker.kernels import rowwise
from hawker.layers.activation import silu_and_mul
from hawker.layers.norm import RMSNorm
from hawker.layers.rotary import RotaryAngles, RotaryEmbedding

pytestmark = pytest.mark.skipif(rowwise._kernels() is None, reason="no C compiler: the kernels cannot be built")

ULP = 2.0**-7  # a bfloat16's last bit, relative


def _torch_path(monkeypatch: pytest.MonkeyPatch, fn, *args):  # type: ignore[no-untyped-def]
    with monkeypatch.context() as patch:
        patch.setenv(rowwise.SWITCH_VARIABLE, "0")
        return fn(*args)


def _assert_within_a_last_bit(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    difference = (got.float() - expected.float()).abs()
    assert bool((difference <= expected.float().abs() * ULP + 1e-30).all())


@pytest.mark.parametrize("size", [576, 64, 17, 1])
@pytest.mark.parametrize("rows", [1, 5, 300])
def test_rms_norm_matches_the_torch_code(size: int, rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(size + rows)
    norm = RMSNorm(size, 1e-5, torch.bfloat16)
    norm.weight.data = torch.randn(size, generator=generator).bfloat16()
    x = (torch.randn(rows, size, generator=generator) * 4).bfloat16()
    assert rowwise.serves(x)
    _assert_within_a_last_bit(norm(x), _torch_path(monkeypatch, norm, x))


@pytest.mark.parametrize("size", [1536, 48, 7])
@pytest.mark.parametrize("rows", [1, 3, 200])
def test_silu_and_mul_matches_the_torch_code(size: int, rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(size * rows)
    # Gates from far negative to far positive (exp's range on both sides) and exact zeros.
    gate_up = (torch.randn(rows, 2 * size, generator=generator) * 6).bfloat16()
    gate_up[:, :3] = torch.tensor([0.0, -90.0, 90.0]).bfloat16()
    _assert_within_a_last_bit(silu_and_mul(gate_up), _torch_path(monkeypatch, silu_and_mul, gate_up))


@pytest.mark.parametrize(("tokens", "heads", "dim"), [(300, 12, 64), (5, 3, 64), (33, 2, 80), (7, 4, 128), (1, 1, 2)])
def test_the_rotation_gives_the_bits_of_the_torch_ops(
    tokens: int, heads: int, dim: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = torch.Generator().manual_seed(tokens * heads + dim)
    angles = RotaryEmbedding(dim, 4096, 10000.0, RopeScaling())(
        torch.randint(0, 4096, (tokens,), generator=generator), torch.bfloat16
    )
    fused = (torch.randn(tokens, heads + 3, dim, generator=generator) * 3).bfloat16()
    x = fused[:, 1 : 1 + heads]  # queries and keys as a view of the fused projection
    rotated = angles.apply(x)
    assert rowwise.rotate(x, angles.cos, angles.signed_sin) is not None
    assert torch.equal(rotated, _torch_path(monkeypatch, angles.apply, x))
    half = RotaryAngles(angles.cos[tokens // 2 :], angles.signed_sin[tokens // 2 :])
    assert torch.equal(half.apply(x[tokens // 2 :]), rotated[tokens // 2 :])  # tokens on their own


def test_strided_views_and_rows_on_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(9)
    fused = torch.randn(40, 12, 64, generator=generator).bfloat16()
    heads = fused[:, 2:9]  # per-head rows as a q-norm sees them: a view with gaps
    norm = RMSNorm(64, 1e-6, torch.bfloat16)
    norm.weight.data = torch.randn(64, generator=generator).bfloat16()
    whole = norm(heads)
    _assert_within_a_last_bit(whole, _torch_path(monkeypatch, norm, heads))
    assert torch.equal(norm(heads[17:18]), whole[17:18])  # a row's bits do not depend on the others
    gate_up = torch.randn(30, 100, generator=generator).bfloat16()[:, :96]
    together = silu_and_mul(gate_up)
    assert torch.equal(silu_and_mul(gate_up[4:5]), together[4:5])


def test_the_switch_and_what_the_kernels_do_not_take(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(4, 8).bfloat16()
    assert not rowwise.serves(x.float()) and not rowwise.serves(x.t())
    monkeypatch.setenv(rowwise.SWITCH_VARIABLE, "0")
    assert not rowwise.serves(x)
    monkeypatch.setenv(rowwise.SWITCH_VARIABLE, "on")
    with pytest.raises(ValueError, match=rowwise.SWITCH_VARIABLE):
        rowwise.serves(x)


@pytest.mark.parametrize("shape", [(128, 49152), (3, 17), (5, 1), (7, 33), (2, 16)])
def test_argmax_is_torch_max_first_index(shape: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(shape[1])
    distinct = torch.randn(*shape, generator=generator).bfloat16()
    ties = torch.randint(0, 3, shape, generator=generator).bfloat16()  # the top value many times in a row
    lowest = torch.full(shape, float("-inf")).bfloat16()
    for x in (distinct, ties, lowest, distinct[:, : max(1, shape[1] - 1)]):
        assert torch.equal(rowwise.argmax(x), x.max(dim=-1).indices)


def test_argmax_leaves_a_row_with_nan_to_torch() -> None:
    x = torch.randn(4, 100).bfloat16()
    x[2, 50] = float("nan")
    assert rowwise.argmax(x) is None
