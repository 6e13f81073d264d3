"""Hawker's AMX kernels against what they replace, at the default model's shapes (benchmarks/NOTES.md, session 15).

1. The row-invariant AMX matmul (hawker/kernels/amx_linear.py) against oneDNN's packed bfloat16 matmul,
   untiled and on the zero-padded 64-row tiles (with their output copies) that consistent numerics ran
   before, at 16, 48, 300 and 2,048 rows.
2. The C prefill attention (hawker/kernels/cpu_prefill_attention.py) on one chunk of 1,536 tokens (9 query
   heads, 3 KV heads of 64, blocks of 16), with AMX tile multiplies and with their off switch
   (``HAWKER_PREFILL_ATTENTION_AMX=0``), in alternating rounds.

Weights and caches are hot (the same ones called again), so these are the kernels' compute rates, not a
decode step's, whose weights come from memory.

    .venv/bin/python benchmarks/amx_kernels.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch

from hawker.kernels import amx_linear, cpu_prefill_attention, packed_linear

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # qkv, o, gate_up, down: (out, in)
ROWS = (16, 48, 300, 2048)
TILE = 64


def milliseconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def tiled_packed(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """What consistent numerics ran before: oneDNN on fixed 64-row tiles, the last zero-padded, copied into place."""
    out = x.new_empty((x.shape[0], out_features))
    for first in range(0, x.shape[0], TILE):
        piece = x[first : first + TILE]
        if piece.shape[0] < TILE:
            piece = torch.cat([piece, piece.new_zeros((TILE - piece.shape[0], x.shape[1]))])
        out[first : first + TILE] = packed_linear.packed_linear(piece, packed, out_features)[: x.shape[0] - first]
    return out


def matmul_row(rows: int, out_features: int, in_features: int, generator: torch.Generator, repeats: int) -> str:
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    amx, packed = amx_linear.pack(weight), packed_linear.pack(weight)
    flop = 2 * rows * out_features * in_features
    times = (
        milliseconds(lambda: amx_linear.amx_linear(x, amx, out_features), repeats),
        milliseconds(lambda: packed_linear.packed_linear(x, packed, out_features), repeats),
        milliseconds(lambda: tiled_packed(x, packed, out_features), repeats),
    )
    cells = " | ".join(f"{t:.3f} ({flop / t / 1e6:.0f})" for t in times)
    return f"  {rows:5d} rows {out_features}x{in_features}: {cells}"


def matmuls(repeats: int) -> None:
    print("matmul, ms a call (GFLOP/s): AMX kernel | oneDNN packed untiled | oneDNN on 64-row tiles + copies")
    generator = torch.Generator().manual_seed(0)
    for rows in ROWS:
        for out_features, in_features in SHAPES:
            print(matmul_row(rows, out_features, in_features, generator, repeats))


def prefill_attention(repeats: int, rounds: int) -> None:
    length, block_size = 1536, 16
    generator = torch.Generator().manual_seed(0)
    # The sequence's blocks in reverse order in a paged cache of [blocks, block size, KV heads, dims].
    k_cache, v_cache = (
        torch.randn(length // block_size, block_size, 3, 64, generator=generator).bfloat16() for _ in range(2)
    )
    tables = torch.arange(length // block_size).flip(0)[None]
    q = torch.randn(length, 15, 64, generator=generator).bfloat16()[:, :9]  # a view of fused q | k | v
    chunk = (torch.tensor([0]), torch.tensor([length]), torch.tensor([0]))
    flop = 2 * 2 * length * (length + 1) / 2 * 64 * 9  # causal: both products over the attended pairs
    print(f"prefill attention, one {length}-token chunk, ms a layer (GFLOP/s), {rounds} alternating rounds:")
    for round_index in range(rounds):
        for setting, name in (("1", "AMX tiles"), ("0", "vector dot products")):
            os.environ[cpu_prefill_attention.AMX_VARIABLE] = setting
            took = milliseconds(
                lambda: cpu_prefill_attention.paged_prefill_attention(q, k_cache, v_cache, tables, *chunk, 0.125),
                repeats,
            )
            print(f"  round {round_index + 1} {name}: {took:.2f} ({flop / took / 1e6:.0f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not (amx_linear.available() and cpu_prefill_attention.amx_available()):
        sys.exit("this CPU has no AMX (or no C compiler): nothing to compare")
    matmuls(args.repeats)
    prefill_attention(args.repeats, args.rounds)


if __name__ == "__main__":
    main()
