"""The GPU benchmark script stays runnable: a CPU smoke run with tiny models of the same families."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_bench_runs_end_to_end_on_tiny_models(tmp_path: Path) -> None:
    out = tmp_path / "gpu_bench.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--tiny", "--num-prompts", "2"]
    command += ["--device", "cpu", "--kv-cache-memory-gb", "0.25", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["models"]) == {"qwen3-0.6b", "llama3-8b"}
    for figures in report["models"].values():
        assert figures["hawker"]["output_tokens"] == figures["transformers"]["output_tokens"] > 0
        assert figures["single_stream_tok_s"] > 0
    assert "| qwen3-0.6b |" in done.stdout
