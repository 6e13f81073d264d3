"""Seconds from starting ``hawker serve`` to its first answer, and to its compiled decode step being ready.

    .venv/bin/python benchmarks/startup_time.py --cold        # empty inductor and native-kernel caches
    .venv/bin/python benchmarks/startup_time.py --prepared    # as --cold, then `hawker prepare` (what setup.sh runs)
    .venv/bin/python benchmarks/startup_time.py -- --compile-warmup blocking

It polls ``/v1/completions`` every 0.2 s until one answers 200, then
``/health`` until it says ``{"status": "ok"}`` (no longer warming up).
Arguments after ``--`` go to ``hawker serve``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HAWKER = Path(sys.executable).with_name("hawker")
POLL_S = 0.2
TIMEOUT_S = 600.0


def _environment(cold: bool) -> dict[str, str]:
    env = dict(os.environ)
    if cold:  # what a fresh machine has: nothing compiled or measured yet
        scratch = tempfile.mkdtemp(prefix="hawker-startup-")
        env["TORCHINDUCTOR_CACHE_DIR"] = f"{scratch}/inductor"
        env["HAWKER_KERNEL_CACHE"] = f"{scratch}/kernels"
    return env


def _first_answer(url: str, process: subprocess.Popen[bytes], deadline: float) -> str:
    body = {"prompt": "Hello, my name is", "max_tokens": 8, "temperature": 0}
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the server exited before answering")
        try:
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            if response.status_code == 200:
                return str(response.json()["choices"][0]["text"])
        except httpx.HTTPError:
            pass
        time.sleep(POLL_S)
    raise RuntimeError(f"no answer in {TIMEOUT_S:.0f} s")


def _wait_warm(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/health", timeout=10).json().get("status") == "ok":
            return
        time.sleep(POLL_S)
    raise RuntimeError(f"still warming up after {TIMEOUT_S:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cold", action="store_true", help="empty inductor and native-kernel caches")
    parser.add_argument(
        "--prepared",
        action="store_true",
        help="as --cold, then run `hawker prepare` (kernels and matmul plans, as scripts/setup.sh does) first",
    )
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("serve_args", nargs="*", help="passed to hawker serve (after --)")
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    command = [str(HAWKER), "serve", "--port", str(args.port), "--log-level", "warning", *args.serve_args]
    env = _environment(args.cold or args.prepared)
    if args.prepared:
        began = time.monotonic()
        subprocess.run([str(HAWKER), "prepare", *args.serve_args], env=env, check=True, capture_output=True)
        print(f"hawker prepare took {time.monotonic() - began:.1f} s", flush=True)
    start = time.monotonic()
    deadline = start + TIMEOUT_S
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    try:
        text = _first_answer(url, process, deadline)
        print(f"first answer after {time.monotonic() - start:.1f} s: {text!r}", flush=True)
        _wait_warm(url, deadline)
        print(f"compiled step ready (/health ok) after {time.monotonic() - start:.1f} s", flush=True)
    finally:
        process.terminate()
        process.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
