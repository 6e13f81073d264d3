"""The server builds its engines off the main thread, so that no CPU thread pool outlives the build.

libgomp keeps a pool of worker threads for every thread that ever started a
parallel region; a pool left on the main thread made every parallel region
of the engine loop thread pay a wake-up (``build_off_main_thread``). The
pool's worker threads are visible in ``/proc/self/task``: these tests count
them, in a fresh interpreter each, so that nothing this test process ran
before is counted.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hawker.engine.async_engine import build_off_main_thread

# Runs a parallel torch op on the main thread or through build_off_main_thread,
# then prints the process's thread count before and after (once the pool, if
# it went with its thread, has had time to wind down).
_COUNT_THREADS = """
import os, sys, time, torch
from hawker.engine.async_engine import build_off_main_thread
torch.set_num_threads(2)  # a pool even on a one-CPU machine
def threads():
    return len(os.listdir("/proc/self/task"))
before = threads()
work = lambda: float(torch.randn(2048, 2048).exp().sum())
value = build_off_main_thread(work) if sys.argv[1] == "off" else work()
deadline = time.monotonic() + 10
while threads() != before and time.monotonic() < deadline:
    time.sleep(0.05)
print(before, threads())
"""

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc (Linux)")


def _threads_before_and_after(where: str) -> tuple[int, int]:
    done = subprocess.run(
        [sys.executable, "-c", _COUNT_THREADS, where], capture_output=True, text=True, check=True, timeout=120
    )
    before, after = done.stdout.split()[-2:]
    return int(before), int(after)


def test_a_build_off_the_main_thread_leaves_no_pool_behind() -> None:
    before, after = _threads_before_and_after("off")
    assert after == before


def test_the_same_work_on_the_main_thread_leaves_a_pool() -> None:
    """The control: the count does see a pool when one is left (so the test above can fail)."""
    before, after = _threads_before_and_after("main")
    assert after > before


def test_the_result_and_the_error_of_the_build_reach_the_caller() -> None:
    assert build_off_main_thread(lambda: 42) == 42

    def fails() -> None:
        raise ValueError("bad model path")

    with pytest.raises(ValueError, match="bad model path"):
        build_off_main_thread(fails)
