"""examples/ray_rl.py runs end to end on a local Ray cluster: a trainer actor, two rollout-engine actors,
weights synced over a process group (a few steps; the measured run is in benchmarks/RESULTS.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ray_rl_example_trains_and_syncs_both_engines_over_a_group() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "ray_rl.py"), "--steps", "3", "--prompts-per-step", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    steps = re.findall(r"step +\d+: mean reward [\d.]+, weight sync \(group\) ([\d.]+) ms", result.stdout)
    assert len(steps) == 3 and all(float(ms) > 0 for ms in steps)
    assert "weight sync per step (group, 2 engines)" in result.stdout
    # Steps 1 and 2 sampled after a sync: the engines' logprobs are the trained weights' (float32).
    mismatch = float(result.stdout.split("trainer logprob|: ")[1].split()[0])
    assert mismatch < 1e-4
