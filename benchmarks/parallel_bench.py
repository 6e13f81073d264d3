"""Tensor / pipeline parallel layouts on this machine, and the TP all-reduce overlap (issue 6).

    .venv/bin/python benchmarks/parallel_bench.py            # every layout, one run
    .venv/bin/python benchmarks/parallel_bench.py --num-prompts 8 --layouts 1x1 2x1

One random-weight Llama-shaped model (built from a config: nothing is
downloaded) runs the standard offline workload (scaled down) in each layout
(TP x PP), and TP 2 with the row-parallel all-reduce split into chunks that
overlap the next chunk's matmul. On a CPU the ranks share the cores
(``share_cpu_cores``), so a layout cannot beat one process here: the point
is the cost of the communication and what overlap recovers of it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from hawker import LLM
from hawker.bench.throughput import ThroughputResult, run_hawker
from hawker.bench.workload import WorkloadSpec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.gpu_bench import build_checkpoint  # noqa: E402

SHAPE: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "max_position_embeddings": 4096,
}


def layout_options(layout: str) -> dict[str, Any]:
    """'2x1' -> TP 2, PP 1; a trailing '+overlapN' splits the all-reduce into N chunks."""
    grid, _, overlap = layout.partition("+overlap")
    tp, pp = (int(part) for part in grid.split("x"))
    return {"tensor_parallel_size": tp, "pipeline_parallel_size": pp, "tp_overlap_chunks": int(overlap or 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "2x1+overlap2", "2x1+overlap4", "1x2"])
    parser.add_argument("--num-prompts", type=int, default=32)
    args = parser.parse_args()
    spec = WorkloadSpec(num_prompts=args.num_prompts, min_input=32, max_input=256, min_output=32, max_output=128)
    results: list[tuple[str, ThroughputResult]] = []
    with tempfile.TemporaryDirectory(prefix="hawker-parallel-") as tmp:
        directory = build_checkpoint("llama", SHAPE, Path(tmp), "cpu")
        for layout in args.layouts:
            # No compiled decode step in any layout: it runs in one process only, and would hide the comparison.
            with LLM(str(directory), dtype="bfloat16", compile_decode_max_rows=0, **layout_options(layout)) as llm:
                result = run_hawker(llm, spec)
            print(f"{layout}: {result.summary()}", flush=True)
            results.append((layout, result))
    base = results[0][1].output_tokens_per_s
    print(f"\n| layout (TP x PP) | output tok/s | vs {results[0][0]} |")
    print("| --- | --- | --- |")
    for layout, result in results:
        print(f"| {layout} | {result.output_tokens_per_s:.1f} | {result.output_tokens_per_s / base:.2f}x |")


if __name__ == "__main__":
    main()
