"""Which copy of a linear layer's weight a step multiplies with.

Every projection keeps its weight in the model dtype. Two optional copies
make the common CPU cases faster without changing what is computed:

- an int4 copy (``hawker/layers/quant.py``) for steps with few rows, whose
  cost is reading the weights: a quarter of the bytes of bfloat16 (half,
  for 8-bit weights held as two int4 halves);
- a float32 copy for steps with many rows, whose cost is arithmetic: on
  CPUs without AMX, torch's bfloat16 matmul runs at about half the float32
  rate (167 vs 322 GFLOP/s on the 2-core development machine, see
  ``benchmarks/NOTES.md``). The bfloat16 inputs and weights widen to float32
  exactly and the product is rounded back to bfloat16 once, which is what a
  bfloat16 matmul with float32 accumulation computes too; only the order of
  the sums differs.

Consistent numerics (the default on CPU, ``EngineConfig.dense_tile_rows`` > 0): a
token's numbers must not depend on how many rows its step has, or a prompt
would decode differently cold and after a prefix-cache hit. The kernels'
reduction order depends on the shape they are given (oneDNN picks its
algorithm by the number of rows: on the development CPU rows 1-32 and
>= 768 share one order, 33-512 another), so a layer with ``dense_tile_rows``
set multiplies every input of more than ``SMALL_ROWS`` rows on fixed tiles
of that many rows and smaller inputs on tiles of ``SMALL_ROWS``, and uses
its int4 copy (whose kernel gives each row the same result whatever the
number of rows) only for inputs of at most ``SMALL_ROWS`` rows. The model
runner never gives a prefill so few rows (it pads prefill forwards), so a
prompt token always takes the large-tile path and a decode token of a step
of up to ``SMALL_ROWS`` sequences always the int4 or small-tile one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hawker.layers.batch_invariant import tiled_rows
from hawker.layers.quant import (
    INT8_PAIR_MAX_ROWS,
    Int4Weight,
    Int8PairWeight,
    quantize_int4,
    quantize_int8_as_int4_pair,
)

# Below about this many rows torch's bfloat16 matmul is as fast as float32
# after widening the input (measured on the development CPU: 28-32 rows).
DEFAULT_FP32_MATMUL_MIN_ROWS = 32
# Consistent numerics: inputs of at most this many rows (decode steps of a
# few sequences) take the int4 copy or small tiles; larger ones fixed large tiles.
SMALL_ROWS = 16
# Rows per tile of the large-input path: large enough that the matmul runs
# near its full rate, small enough that a short prefill wastes little on padding.
DEFAULT_DENSE_TILE_ROWS = 128


@dataclass(frozen=True)
class Fp32Weight:
    """A float32 copy of a half-precision weight for inputs of many rows."""

    weight: torch.Tensor
    min_rows: int

    def applies_to(self, x: torch.Tensor) -> bool:
        return x.dim() == 2 and x.shape[0] >= self.min_rows

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x.float(), self.weight, None if bias is None else bias.float()).to(x.dtype)


class ProjectionCopies:
    """Mixin for a layer with a 2-D ``weight``: optional int4 / float32 copies and the matmul that picks one."""

    weight: torch.Tensor
    int4: Int4Weight | Int8PairWeight | None = None
    fp32: Fp32Weight | None = None
    # > 0: consistent numerics, inputs multiplied on fixed row tiles (see the module docstring).
    dense_tile_rows: int = 0

    def attach_int4(self, max_rows: int) -> bool:
        """Keep an int4 copy of the (loaded) weight for inputs of at most ``max_rows`` rows.

        A weight on an 8-bit grid (Q8_0) gets its codes as two int4 halves,
        for fewer rows (where that is faster than the dense weight).
        """
        weight = self.weight.data
        self.int4 = quantize_int4(weight, max_rows) or quantize_int8_as_int4_pair(
            weight, min(max_rows, INT8_PAIR_MAX_ROWS)
        )
        return self.int4 is not None

    def attach_fp32(self, min_rows: int) -> bool:
        """Keep a float32 copy of the (loaded) weight for inputs of at least ``min_rows`` rows."""
        if self.weight.dtype not in (torch.bfloat16, torch.float16):
            return False
        self.fp32 = Fp32Weight(self.weight.data.float(), min_rows)
        return True

    def refresh_fp32(self) -> None:
        """After the weight changed: rewrite the float32 copy in place (a compiled decode graph holds that tensor)."""
        if self.fp32 is not None:
            self.fp32.weight.copy_(self.weight.data)

    def project(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x W^T (+ bias)`` through the copy that suits the number of rows of ``x``."""
        if self.dense_tile_rows and x.dim() == 2:
            return self._project_consistently(x, bias)
        if self.int4 is not None and self.int4.applies_to(x):
            out = self.int4.matmul(x)
            return out if bias is None else out + bias
        if self.fp32 is not None and self.fp32.applies_to(x):
            return self.fp32.matmul(x, bias)
        return F.linear(x, self.weight, bias)

    def _project_consistently(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The same result for a row whatever the other rows: int4 or ``SMALL_ROWS`` tiles for small inputs,
        ``dense_tile_rows`` tiles for large ones (the bias is added after the matmul, row by row)."""
        rows = x.shape[0]
        if rows <= SMALL_ROWS and self.int4 is not None:
            out = self.int4.matmul(x)
        else:
            tile = SMALL_ROWS if rows <= SMALL_ROWS else self.dense_tile_rows
            out = self._dense_tiles(x, tile)
        return out if bias is None else out + bias

    def _dense_tiles(self, x: torch.Tensor, tile: int) -> torch.Tensor:
        """``tiled_rows(self._dense_matmul, x, tile)``, full tiles written in place into one output.

        ``torch.mm(..., out=)`` into a row slice runs the kernel ``F.linear``
        runs on a fresh tile and gives the same bits (``tests/test_projection.py``),
        without concatenating the tiles' outputs afterwards: 8 % of a long
        prefill's time went to that copy.
        """
        rows = x.shape[0]
        full = rows // tile * tile
        if self.fp32 is not None or full <= tile:
            return tiled_rows(self._dense_matmul, x, tile)
        out = x.new_empty((rows, self.weight.shape[0]))
        weight_t = self.weight.t()
        for first in range(0, full, tile):
            torch.mm(x[first : first + tile], weight_t, out=out[first : first + tile])
        if full < rows:
            out[full:] = tiled_rows(self._dense_matmul, x[full:], tile)
        return out

    def _dense_matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32 is not None:
            return self.fp32.matmul(x, None)
        return F.linear(x, self.weight)


def attach_weight_copies(
    model: nn.Module, int4_max_rows: int, fp32_min_rows: int, dense_tile_rows: int = 0
) -> tuple[int, int]:
    """Give every projection of a loaded model the copies asked for (0 = none of that kind).

    int4 copies go only to layers whose weights are 4- or 8-bit already, float32
    copies only to half-precision ones. ``dense_tile_rows`` > 0 turns on
    consistent numerics (module docstring): then only 4-bit layers get int4
    copies (the 8-bit pair pays off only below ``SMALL_ROWS`` rows), and a
    float32 copy serves every large input. Returns how many layers got each.
    """
    int4_count = fp32_count = 0
    for module in model.modules():
        if not isinstance(module, ProjectionCopies):
            continue
        module.dense_tile_rows = dense_tile_rows
        if dense_tile_rows:
            if int4_max_rows:
                module.int4 = quantize_int4(module.weight.data, SMALL_ROWS)
                int4_count += module.int4 is not None
            if fp32_min_rows:
                fp32_count += module.attach_fp32(fp32_min_rows)
            continue
        if int4_max_rows:
            int4_count += module.attach_int4(int4_max_rows)
        if fp32_min_rows:
            fp32_count += module.attach_fp32(fp32_min_rows)
    return int4_count, fp32_count


def cpu_has_fast_half_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 faster than float32 (it has AMX tiles, as torch sees them)."""
    init_amx = getattr(torch._C._cpu, "_init_amx", None)
    return bool(init_amx()) if init_amx is not None else False
