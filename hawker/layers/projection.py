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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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
        if self.int4 is not None and self.int4.applies_to(x):
            out = self.int4.matmul(x)
            return out if bias is None else out + bias
        if self.fp32 is not None and self.fp32.applies_to(x):
            return self.fp32.matmul(x, bias)
        return F.linear(x, self.weight, bias)


def attach_weight_copies(model: nn.Module, int4_max_rows: int, fp32_min_rows: int) -> tuple[int, int]:
    """Give every projection of a loaded model the copies asked for (0 = none of that kind).

    int4 copies go only to layers whose weights are 4- or 8-bit already, float32
    copies only to half-precision ones. Returns how many layers got each.
    """
    int4_count = fp32_count = 0
    for module in model.modules():
        if not isinstance(module, ProjectionCopies):
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
