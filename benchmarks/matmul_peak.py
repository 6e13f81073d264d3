"""The machine's practical matmul limit: F.linear GFLOP/s at the default model's shapes.

Hawker's throughput is reported as a fraction of this number, so it is measured
on the same machine with the same torch build, at the shapes the engine runs
(SmolLM2-135M: hidden 576, MLP 1536, vocabulary 49152; 128 and 1024 rows).

    .venv/bin/python benchmarks/matmul_peak.py
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = ((1536, 576), (576, 1536), (576, 576), (49152, 576))  # (out_features, in_features)
ROWS = (128, 1024)


def seconds_per_call(x: torch.Tensor, weight: torch.Tensor, repeats: int) -> float:
    for _ in range(3):  # warm-up: oneDNN/MKL pick and cache their kernels
        F.linear(x, weight)
    start = time.perf_counter()
    for _ in range(repeats):
        F.linear(x, weight)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for dtype in (torch.bfloat16, torch.float32):
        rates = []
        for rows in ROWS:
            for out_features, in_features in SHAPES:
                x = torch.randn(rows, in_features, dtype=dtype)
                weight = torch.randn(out_features, in_features, dtype=dtype)
                flops = 2 * rows * out_features * in_features
                rate = flops / seconds_per_call(x, weight, args.repeats) / 1e9
                rates.append(rate)
                shape = f"[{rows:4d} x {in_features:4d}] @ [{in_features:4d} x {out_features:5d}]"
                print(f"{dtype!s:15s} {shape}: {rate:6.1f} GFLOP/s")
        print(f"{dtype!s:15s} best {max(rates):.1f} GFLOP/s, median {sorted(rates)[len(rates) // 2]:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
