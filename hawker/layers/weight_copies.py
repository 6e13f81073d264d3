"""The forms a projection's weight can be multiplied in, each a copy of the same values.

Which one is fastest depends on the CPU and on the number of rows of the
step, so a layer keeps the copies its measured plan uses
(hawker/layers/matmul_plan.py) and the plan picks one per step:

- ``dense``: ``F.linear`` on the weight itself (no copy);
- ``packed``: the weight prepacked for oneDNN (hawker/kernels/packed_linear.py):
  the same kernel without a per-call reorder, much faster for few rows;
- ``panel``: the bfloat16 weight in panels of 32 outputs for a C kernel with
  float32 sums (hawker/kernels/panel_linear.py): half the bytes of ``fp32``
  at its arithmetic speed where oneDNN's bfloat16 matmul is slow (AVX-512
  without AMX); each row's bits independent of the other rows;
- ``amx``: the same panels for a C kernel of AMX tile multiplies
  (hawker/kernels/amx_linear.py): near oneDNN's bfloat16 speed on many rows,
  with each row's bits independent of the other rows, so consistent numerics
  can use it untiled;
- ``amxq4``: a weight on GGUF Q4_1's grid kept as its 4-bit codes with float16
  scales and offsets, dequantised inside the AMX kernel into exactly the
  ``amx`` copy's panels: the same bits from a third of the bytes, for steps
  whose weights come from memory;
- ``fp32``: a float32 copy of a half-precision weight, for CPUs whose
  half-precision matmul is slower than float32's (no AVX512-BF16, no AMX):
  inputs widen exactly, and the product is rounded back once, which is what a
  half-precision matmul with float32 accumulation computes up to the order of
  its sums;
- ``int4`` / ``int8pair``: weights that are 4- or 8-bit in the checkpoint, kept
  packed (hawker/layers/quant.py): a quarter (half) of the bytes to read, for
  steps whose cost is reading the weights;
- ``int8dot``: the same 4- or 8-bit codes for a C kernel that quantises the
  activations to 8 bits per group of 32 and sums integer products
  (hawker/kernels/int8_dot_linear.py, as llama.cpp does): the bytes of the
  codes and 4x the products per instruction of float32 FMAs, at the price of
  the activations' rounding to 8 bits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F

from hawker.kernels import amx_linear, int8_dot_linear, packed_linear, panel_linear
from hawker.layers.quant import Grid, WeightGrids, int4_from_grid, int8_pair_from_grid

DENSE, PACKED, PANEL, FP32, INT4, INT8PAIR, INT8DOT = "dense", "packed", "panel", "fp32", "int4", "int8pair", "int8dot"
AMX, AMXQ4 = "amx", "amxq4"
# float16 (the kernel's scales) keeps 11 significant bits: a scale it moves by more than this is out of its range.
_FLOAT16_RELATIVE_TOLERANCE = 2**-10


class WeightCopy(Protocol):
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T`` for 2-D ``x`` in the model dtype."""
        ...

    def refresh(self, weight: torch.Tensor) -> None:
        """Rewrite the copy in place from new values of the weight (compiled graphs hold its tensors)."""
        ...

    def nbytes(self) -> int:
        """Bytes a product reads."""
        ...


# Makes one copy of a weight (see RECIPES).
Recipe = Callable[[], WeightCopy]
# Whether a weight (with its grids) has a form: None if not, else how to make that copy.
RecipeFinder = Callable[[torch.Tensor, WeightGrids], Recipe | None]


@dataclass(frozen=True)
class DenseWeight:
    weight: torch.Tensor  # the layer's own parameter data

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def matmul_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """``out[:] = x @ W^T`` without a temporary: ``torch.mm`` runs the kernel ``F.linear`` runs, same bits."""
        torch.mm(x, self.weight.t(), out=out)

    def refresh(self, weight: torch.Tensor) -> None:
        del weight  # it is the weight

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


@dataclass(frozen=True)
class PackedWeight:
    packed: torch.Tensor  # opaque oneDNN tensor
    out_features: int
    weight_bytes: int

    @staticmethod
    def recipe(weight: torch.Tensor, grids: WeightGrids) -> Recipe | None:
        if weight.device.type != "cpu" or not packed_linear.available(weight.dtype):
            return None
        return lambda: PackedWeight(packed_linear.pack(weight), weight.shape[0], weight.numel() * weight.element_size())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear.packed_linear(x, self.packed, self.out_features)

    def refresh(self, weight: torch.Tensor) -> None:
        packed_linear.repack_into(self.packed, weight)

    def nbytes(self) -> int:
        return self.weight_bytes


@dataclass(frozen=True)
class PanelWeight:
    panel: torch.Tensor  # [ceil(out / 32), in / 2, 32, 2] bfloat16
    out_features: int

    @staticmethod
    def recipe(weight: torch.Tensor, grids: WeightGrids) -> Recipe | None:
        if not panel_linear.supports(weight):
            return None
        return lambda: PanelWeight(panel_linear.pack(weight), weight.shape[0])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return panel_linear.panel_linear(x, self.panel, self.out_features)

    def refresh(self, weight: torch.Tensor) -> None:
        panel_linear.repack_into(self.panel, weight)

    def nbytes(self) -> int:
        return self.panel.numel() * self.panel.element_size()


@dataclass(frozen=True)
class AmxWeight(PanelWeight):
    """The same panels (refreshed and sized alike), multiplied by AMX tiles."""

    @staticmethod
    def recipe(weight: torch.Tensor, grids: WeightGrids) -> Recipe | None:
        if not amx_linear.supports(weight):
            return None
        return lambda: AmxWeight(amx_linear.pack(weight), weight.shape[0])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return amx_linear.amx_linear(x, self.panel, self.out_features)


@dataclass(frozen=True)
class AmxQ4Weight:
    packed: torch.Tensor  # uint8 [ceil(out / 32), in / 32, 640] (hawker/kernels/amx_linear.py's pack_q4)
    out_features: int

    @staticmethod
    def recipe(weight: torch.Tensor, grids: WeightGrids) -> Recipe | None:
        """The weight's exact 4-bit grid (never re-quantised), where the AMX kernel is built."""
        grid = grids.exact_float16_int4 if amx_linear.supports(weight) else None
        if grid is None:
            return None
        scale, offset = grid.scale.squeeze(-1), grid.offset.squeeze(-1)
        return lambda: AmxQ4Weight(amx_linear.pack_q4(grid.codes, scale, offset), weight.shape[0])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return amx_linear.amx_q4_linear(x, self.packed, self.out_features)

    def refresh(self, weight: torch.Tensor) -> None:
        raise ValueError("an amxq4 copy holds the checkpoint's 4-bit codes; new weights cannot be written into it")

    def nbytes(self) -> int:
        return self.packed.numel()


@dataclass(frozen=True)
class Fp32Weight:
    weight: torch.Tensor  # float32 [out, in]

    @staticmethod
    def recipe(weight: torch.Tensor, grids: WeightGrids) -> Recipe | None:
        if weight.dtype not in (torch.bfloat16, torch.float16):
            return None
        return lambda: Fp32Weight(weight.float())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight).to(x.dtype)

    def refresh(self, weight: torch.Tensor) -> None:
        self.weight.copy_(weight)

    def nbytes(self) -> int:
        return self.weight.numel() * 4


@dataclass(frozen=True)
class IntDotWeight:
    packed: torch.Tensor  # uint8 [ceil(out / 16), in / 32, block] (hawker/kernels/int8_dot_linear.py)
    bits: int
    out_features: int

    @staticmethod
    def recipe(weight: torch.Tensor, grids: WeightGrids) -> Recipe | None:
        """The weight's 4-bit codes, else its 8-bit ones, when it lies on such a grid (never re-quantised)."""
        if weight.device.type != "cpu" or not int8_dot_linear.available():
            return None
        bits, grid = (4, grids.int4) if grids.int4 is not None else (8, grids.int8)
        if grid is None or not _fits_float16(grid):
            return None
        return lambda: IntDotWeight._from_grid(grid, bits)

    @staticmethod
    def _from_grid(grid: Grid, bits: int) -> IntDotWeight:
        scale, offset = grid.scale.squeeze(-1), grid.offset.squeeze(-1)
        packed = int8_dot_linear.pack(grid.codes, scale, offset, bits)
        return IntDotWeight(packed, bits, grid.codes.shape[0])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return int8_dot_linear.int8_dot_linear(x, self.packed, self.bits, self.out_features)

    def refresh(self, weight: torch.Tensor) -> None:
        raise ValueError("an int8dot copy holds the checkpoint's 4/8-bit codes; new weights cannot be written into it")

    def nbytes(self) -> int:
        return self.packed.numel()


def _fits_float16(grid: Grid) -> bool:
    """Scales and offsets that float16 holds to its precision (none too large, none lost below its range)."""
    for values in (grid.scale, grid.offset):
        error = (values.to(torch.float16).float() - values).abs()
        if not bool((error <= _FLOAT16_RELATIVE_TOLERANCE * values.abs()).all()):
            return False
    return True


def _dense(weight: torch.Tensor, grids: WeightGrids) -> Recipe | None:
    return lambda: DenseWeight(weight)


def _int4(weight: torch.Tensor, grids: WeightGrids) -> Recipe | None:
    grid = grids.int4
    return None if grid is None else lambda: int4_from_grid(grid, weight.dtype)


def _int8pair(weight: torch.Tensor, grids: WeightGrids) -> Recipe | None:
    grid = grids.int8
    return None if grid is None else lambda: int8_pair_from_grid(grid, weight.dtype)


# Whether a loaded weight has each form (None: it has not) and, if so, how to make that copy. Asking is cheap
# once the weight's grids are found (shared by every form of one weight); making a copy is not, so a layer
# makes only the copies its plan uses or that are timed (hawker/layers/projection.py).
RECIPES: dict[str, RecipeFinder] = {
    DENSE: _dense,
    PACKED: PackedWeight.recipe,
    PANEL: PanelWeight.recipe,
    AMX: AmxWeight.recipe,
    AMXQ4: AmxQ4Weight.recipe,
    FP32: Fp32Weight.recipe,
    INT4: _int4,
    INT8PAIR: _int8pair,
    INT8DOT: IntDotWeight.recipe,
}


def build_copy(kernel: str, weight: torch.Tensor, grids: WeightGrids | None = None) -> WeightCopy | None:
    """``kernel``'s copy of ``weight`` (its grids found now unless given), None where it has no such form."""
    recipe = RECIPES[kernel](weight, grids or WeightGrids(weight))
    return None if recipe is None else recipe()


# The same as one call per kernel, for callers that make a single copy of a weight.
BUILDERS: dict[str, Callable[[torch.Tensor], WeightCopy | None]] = {
    kernel: partial(build_copy, kernel) for kernel in RECIPES
}
