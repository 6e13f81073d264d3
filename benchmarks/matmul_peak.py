"""The machine's practical limits: F.linear GFLOP/s at the default model's shapes, memory read GB/s.

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


def linear_rates(dtype: torch.dtype, repeats: int = 30) -> list[tuple[str, float]]:
    """(shape, GFLOP/s) of ``F.linear`` at each of the model's shapes."""
    torch.manual_seed(0)
    rates = []
    for rows in ROWS:
        for out_features, in_features in SHAPES:
            x = torch.randn(rows, in_features, dtype=dtype)
            weight = torch.randn(out_features, in_features, dtype=dtype)
            flops = 2 * rows * out_features * in_features
            shape = f"[{rows:4d} x {in_features:4d}] @ [{in_features:4d} x {out_features:5d}]"
            rates.append((shape, flops / seconds_per_call(x, weight, repeats) / 1e9))
    return rates


def read_bandwidth_gb_s(gib: float = 1.0, repeats: int = 5) -> float:
    """Memory read bandwidth: ``torch.sum`` over a float32 tensor much larger than the caches."""
    data = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    for _ in range(2):
        data.sum()
    start = time.perf_counter()
    for _ in range(repeats):
        data.sum()
    return data.numel() * 4 * repeats / (time.perf_counter() - start) / 1e9


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for dtype in (torch.bfloat16, torch.float32):
        rates = linear_rates(dtype, args.repeats)
        for shape, rate in rates:
            print(f"{dtype!s:15s} {shape}: {rate:6.1f} GFLOP/s")
        values = [rate for _, rate in rates]
        print(f"{dtype!s:15s} best {max(values):.1f} GFLOP/s, median {median(values):.1f} GFLOP/s")
    print(f"memory read bandwidth: {read_bandwidth_gb_s():.1f} GB/s")


if __name__ == "__main__":
    main()
