"""examples/grpo.py runs end to end (a few steps; the full run is recorded in benchmarks/RESULTS.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_grpo_example_runs_and_syncs_weights(tmp_path: Path) -> None:
    plot = tmp_path / "reward.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "grpo.py"), "--steps", "3", "--plot", str(plot)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "weight sync" in result.stdout and plot.stat().st_size > 0
    mismatch = float(result.stdout.split("trainer logprob|: ")[1].split()[0])
    assert mismatch < 1e-4  # Hawker's logprobs are the trainer's (float32, temperature 1)
