"""Weight-only int4 copies of linear weights for decode steps with few rows.

A decode step with one or a few sequences reads every weight once and does
little arithmetic with it, so its speed is the memory bandwidth divided by
the bytes of weights. bfloat16 weights of the default model are 269 MB a
step; int4 with a bf16 scale and zero per group of 32 is about a quarter of
that. torch's CPU kernel (``_weight_int4pack_mm_for_cpu``) is faster than
bf16 ``F.linear`` for a handful of rows and slower for many, so layers keep
both copies and pick by the number of rows.

The grouping (32 weights, asymmetric: w = scale * q + min, q in 0..15) is
GGUF Q4_1's. Only weights that already lie on such a grid get a copy, so the
copy holds the file's own 4-bit values and changes nothing but speed (and
rounding): the default model's Q4_1 layers qualify, its Q8_0 embedding / LM
head and any unquantized checkpoint do not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT4_GROUP_SIZE = 32
# _convert_weight_to_int4pack_for_cpu's tiling of the input dimension.
_INNER_K_TILES = 2
# The int4 kernel beats bfloat16 F.linear up to about 24 rows on the
# development CPU with the default model's shapes (benchmarks/NOTES.md);
# 16 leaves a margin.
DEFAULT_INT4_DECODE_MAX_ROWS = 16
# How far (in grid steps) a stored weight may sit from its group's 4-bit grid
# and still count as 4-bit: bf16 rounding moves Q4_1 values by < 0.05 steps,
# while 8-bit or unquantized weights sit up to 0.5 steps away.
GRID_TOLERANCE = 0.2


@dataclass(frozen=True)
class Int4Weight:
    """A packed int4 weight ([out, in] before packing) and its per-group scales and zeros."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor  # [in / group, out, 2] in the activation dtype
    group_size: int
    max_rows: int  # inputs with more rows than this use the dense weight

    def applies_to(self, x: torch.Tensor) -> bool:
        return x.dim() == 2 and x.shape[0] <= self.max_rows

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T`` for 2-D ``x`` in the dtype of the scales."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.contiguous(), self.packed, self.group_size, self.scales_and_zeros
        )


def quantize_int4(weight: torch.Tensor, max_rows: int, group_size: int = INT4_GROUP_SIZE) -> Int4Weight | None:
    """The int4 copy of ``weight`` [out, in] if it already lies on a 4-bit grid per group, else None.

    Only weights that were 4-bit to begin with (GGUF Q4_1/Q4_0, dequantised at
    load) pass: re-quantising anything finer would change the model's outputs.
    A weight passes when every value is within ``GRID_TOLERANCE`` steps of its
    group's grid; the weights are stored in the model dtype, whose rounding
    moves a grid value by a few hundredths of a step at most.
    """
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
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        codes.to(torch.int32).view(out_features, in_features), _INNER_K_TILES
    )
    # The kernel computes (q - 8) * scale + zero, so zero = min + 8 * scale.
    scale, low = scale.squeeze(-1), low.squeeze(-1)
    scales_and_zeros = torch.stack([scale.t(), (low + 8 * scale).t()], dim=-1).to(weight.dtype).contiguous()
    return Int4Weight(packed, scales_and_zeros, group_size, max_rows)
