"""Weight-only int4 copies of linear weights for decode steps with few rows.

A decode step with one or a few sequences reads every weight once and does
little arithmetic with it, so its speed is the memory bandwidth divided by
the bytes of weights. bfloat16 weights of the default model are 269 MB a
step; int4 with a bf16 scale and zero per group of 32 is about a quarter of
that. torch's CPU kernel (``_weight_int4pack_mm_for_cpu``) is faster than
bf16 ``F.linear`` for a handful of rows and slower for many, so layers keep
both copies and their measured plan picks one by the number of rows
(hawker/layers/matmul_plan.py).

The grouping (32 weights, asymmetric: w = scale * q + min, q in 0..15) is
GGUF Q4_1's. Only weights that already lie on such a grid get a copy, so the
copy holds the file's own 4-bit values and changes nothing but speed (and
rounding): the default model's Q4_1 layers qualify, its Q8_0 embedding / LM
head and any unquantized checkpoint do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

INT4_GROUP_SIZE = 32
# _convert_weight_to_int4pack_for_cpu's tiling of the input dimension.
_INNER_K_TILES = 2
# How far (in grid steps) a stored weight may sit from its group's 4-bit grid
# and still count as 4-bit: bf16 rounding moves Q4_1 values by < 0.05 steps,
# while 8-bit or unquantized weights sit up to 0.5 steps away.
GRID_TOLERANCE = 0.2
# bfloat16 keeps 8 significant bits: a Q8_0 value rounded to it moves by at
# most 2^-9 of itself, and the scale recovered from the rounded maximum by as
# much again.
Q8_RELATIVE_TOLERANCE = 2**-7


@dataclass(frozen=True)
class Int4Weight:
    """A packed int4 weight ([out, in] before packing) and its per-group scales and zeros."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor  # [in / group, out, 2] in the activation dtype
    group_size: int

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T`` for 2-D ``x`` in the dtype of the scales."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.contiguous(), self.packed, self.group_size, self.scales_and_zeros
        )

    def refresh(self, weight: torch.Tensor) -> None:
        raise ValueError("an int4 copy holds the checkpoint's 4-bit values; new weights cannot be written into it")

    def nbytes(self) -> int:
        """Bytes a matmul reads."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_and_zeros))


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> Int4Weight | None:
    """The int4 copy of ``weight`` [out, in] if it already lies on a 4-bit grid per group, else None.

    Only weights that were 4-bit to begin with (GGUF Q4_1/Q4_0, dequantised at
    load) pass: re-quantising anything finer would change the model's outputs.
    A weight passes when every value is within ``GRID_TOLERANCE`` steps of its
    group's grid; the weights are stored in the model dtype, whose rounding
    moves a grid value by a few hundredths of a step at most.
    """
    grid = int4_grid(weight, group_size)
    return None if grid is None else int4_from_grid(grid, weight.dtype)


def int4_from_grid(grid: Grid, dtype: torch.dtype) -> Int4Weight:
    """The int4 copy of a weight of ``dtype`` on ``grid`` (``int4_grid``'s)."""
    # The kernel computes (q - 8) * scale + zero, so zero = min + 8 * scale.
    return _pack(grid.codes, grid.scale, grid.offset + 8 * grid.scale, dtype)


@dataclass(frozen=True)
class Grid:
    """A weight [out, in] as ``scale * codes + offset`` per group of inputs (scale, offset [out, groups, 1])."""

    codes: torch.Tensor  # uint8 [out, in]
    scale: torch.Tensor
    offset: torch.Tensor


def int4_grid(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> Grid | None:
    """``weight``'s 4-bit codes (0..15) with per-group scale and minimum, if it lies on such a grid (see
    ``quantize_int4``), else None."""
    if weight.dim() != 2 or weight.shape[1] % group_size or weight.device.type != "cpu":
        return None
    out_features, in_features = weight.shape
    groups = weight.float().view(out_features, in_features // group_size, group_size)
    low = groups.amin(-1, keepdim=True)
    # A constant group has no range; any positive scale represents it exactly.
    scale = ((groups.amax(-1, keepdim=True) - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    codes = ((groups - low) / scale).round().clamp(0, 15)
    off_grid = (codes * scale + low - groups).abs() > GRID_TOLERANCE * scale
    if bool(off_grid.any()):
        return None
    return Grid(codes.to(torch.uint8).view(out_features, in_features), scale, low)


# Float16 steps (in units of its last place) tried around a group's estimated offset and scale when the estimate
# does not give back its values.
_OFFSET_NEIGHBOURS = range(-4, 5)
_SCALE_NEIGHBOURS = range(-6, 7)


def exact_float16_int4_grid(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> Grid | None:
    """``weight``'s 4-bit grid with float16 scales and offsets that give back its very values: each
    ``scale * code + offset`` in float32 (the product is exact: 11 significant bits times 4, so one rounding,
    as GGUF's Q4_1 is dequantised at load: hawker/loader/gguf.py) rounded to ``weight``'s dtype equals the
    weight's value, else None.

    A Q4_1 block's float16 minimum and scale are near the grid's least value and step rounded to float16
    (exact for all 3.3 million groups of the default model, whose minima are bfloat16 values); a group they
    do not give back is searched among the float16 values a few places around them. Values below float32's
    normal range are refused (the AMX kernel's bfloat16 conversion flushes them to zero)."""
    grid = int4_grid(weight, group_size)
    return None if grid is None else exact_float16_of(weight, grid)


def exact_float16_of(weight: torch.Tensor, grid: Grid) -> Grid | None:
    """``exact_float16_int4_grid`` given ``weight``'s ``int4_grid``."""
    groups = grid.codes.view(weight.shape[0], -1, grid.codes.shape[1] // grid.scale.shape[1])
    target = weight.view(groups.shape)
    scale, offset = grid.scale.half(), grid.offset.half()
    wrong = ~_gives_back(scale, offset, groups, target)
    if bool(wrong.any()):
        _search_neighbours(scale, offset, groups, target, wrong)
        if bool(wrong.any()):
            return None
    if not (bool(scale.isfinite().all()) and bool(offset.isfinite().all())):
        return None
    tiny = torch.finfo(torch.float32).tiny
    if bool(((weight != 0) & (weight.float().abs() < tiny)).any()):
        return None
    return Grid(grid.codes, scale.float(), offset.float())


def _gives_back(scale: torch.Tensor, offset: torch.Tensor, codes: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per group [..., 1]: ``(scale * codes) + offset`` rounded to the target's dtype is the target."""
    values = (scale.float() * codes + offset.float()).to(target.dtype)
    return (values == target).all(-1, keepdim=True)


def _search_neighbours(
    scale: torch.Tensor, offset: torch.Tensor, codes: torch.Tensor, target: torch.Tensor, wrong: torch.Tensor
) -> None:
    """For the ``wrong`` groups, float16 neighbours of their scale and offset that give their values back,
    written in place (``wrong`` cleared where found)."""
    index = wrong.squeeze(-1).nonzero(as_tuple=True)
    base_scale, base_offset = scale[index].view(torch.int16), offset[index].view(torch.int16)
    group_codes, group_target = codes[index], target[index]
    found = torch.zeros_like(base_scale, dtype=torch.bool)
    for offset_step in _OFFSET_NEIGHBOURS:
        for scale_step in _SCALE_NEIGHBOURS:
            trial_scale = (base_scale + scale_step).view(torch.float16)
            trial_offset = (base_offset + offset_step).view(torch.float16)
            fits = _gives_back(trial_scale, trial_offset, group_codes, group_target) & ~found
            if bool(fits.any()):
                rows = tuple(part[fits.squeeze(-1)] for part in index)
                scale[rows] = trial_scale[fits.squeeze(-1)]
                offset[rows] = trial_offset[fits.squeeze(-1)]
                found |= fits
    wrong[index] = ~found


@dataclass(frozen=True)
class Int8PairWeight:
    """An 8-bit weight (GGUF Q8_0's grid) as two int4 weights: its codes' high and low nibbles.

    torch has no CPU kernel for int8 weights with a scale per group of 32, but
    its int4 one takes per-group scales and zeros: with ``u = code + 128``,
    ``code * d = 16 d (u // 16 - 8) + d (u % 16 - 8) + 8 d``, two int4
    products. They read 28 MB for the default model's LM head instead of
    bfloat16's 57 MB (benchmarks/NOTES.md).
    """

    high: Int4Weight
    low: Int4Weight

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.high.matmul(x) + self.low.matmul(x)

    def refresh(self, weight: torch.Tensor) -> None:
        self.high.refresh(weight)

    def nbytes(self) -> int:
        return self.high.nbytes() + self.low.nbytes()


def quantize_int8_as_int4_pair(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> Int8PairWeight | None:
    """An ``Int8PairWeight`` of ``weight`` [out, in] if it lies on Q8_0's grid per group, else None.

    Q8_0 stores ``code * d`` with ``d = max |w| / 127`` per group and codes in
    -127..127. The weights arrive rounded to the model dtype, which moves a
    value by its own relative precision, so the test is relative: every
    value within ``Q8_RELATIVE_TOLERANCE`` of its grid point. Unquantized
    weights fail it (their small codes sit up to half a step, i.e. many
    percent, away from the grid).
    """
    grid = int8_grid(weight, group_size)
    return None if grid is None else int8_pair_from_grid(grid, weight.dtype)


def int8_pair_from_grid(grid: Grid, dtype: torch.dtype) -> Int8PairWeight:
    """The ``Int8PairWeight`` of a weight of ``dtype`` on ``grid`` (``int8_grid``'s)."""
    high = _pack(grid.codes // 16, 16 * grid.scale, torch.zeros_like(grid.scale), dtype)
    low = _pack(grid.codes % 16, grid.scale, 8 * grid.scale, dtype)
    return Int8PairWeight(high, low)


def int8_grid(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> Grid | None:
    """``weight`` on Q8_0's grid (see ``quantize_int8_as_int4_pair``) as unsigned codes ``code + 128``
    (0..255) with offset ``-128 * scale``, else None."""
    if weight.dim() != 2 or weight.shape[1] % group_size or weight.device.type != "cpu":
        return None
    out_features, in_features = weight.shape
    groups = weight.float().view(out_features, in_features // group_size, group_size)
    scale = (groups.abs().amax(-1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    codes = (groups / scale).round().clamp(-127, 127)
    off_grid = (codes * scale - groups).abs() > Q8_RELATIVE_TOLERANCE * groups.abs()
    if bool(off_grid.any()):
        return None
    return Grid((codes + 128).to(torch.uint8).view(out_features, in_features), scale, -128 * scale)


def _pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> Int4Weight:
    """codes [out, in] in 0..15; scale, zero [out, groups, 1]: w = (code - 8) * scale + zero."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), _INNER_K_TILES)
    scale, zero = scale.squeeze(-1), zero.squeeze(-1)
    scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()
    return Int4Weight(packed, scales_and_zeros, codes.shape[1] // scale.shape[1])


class WeightGrids:
    """The 4- and 8-bit grids one weight lies on, each found at most once: finding one reads the whole weight
    a dozen times over in float32 (~15 ms for a 960 x 576 weight), and the weight's copies share them
    (hawker/layers/weight_copies.py: the int4, int8dot and amxq4 copies all start from the 4-bit grid)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    @cached_property
    def int4(self) -> Grid | None:
        return int4_grid(self.weight)

    @cached_property
    def int8(self) -> Grid | None:
        return int8_grid(self.weight)

    @cached_property
    def exact_float16_int4(self) -> Grid | None:
        return None if self.int4 is None else exact_float16_of(self.weight, self.int4)
