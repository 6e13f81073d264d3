"""Serving throughput of `hawker serve` with and without a browser open on its /dashboard.

One server (default model), the same standard workload sent all at once in
every run, runs alternating without and with a headless Chromium (Debian's,
through Playwright) showing /dashboard, in the order given (ABBA by default,
so that a slow drift of the machine falls on both sides). Prefix caching is
off so that repeating the workload does not turn later runs' prefill into
cache hits. For each run: `hawker bench serve`'s numbers, and the CPU time
the server process and the browser used. Then the cost of one /v1/stats
call on the idle server, and (with --screenshot) a picture of the dashboard
during a last, unmeasured run at a moderate request rate.

    .venv/bin/python benchmarks/dashboard_overhead.py --num-prompts 24 --screenshot docs/dashboard.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
HAWKER = str(REPO / ".venv" / "bin" / "hawker")


@dataclass(frozen=True)
class RunResult:
    condition: str
    output_tok_s: float
    duration_s: float
    ttft_p50_s: float
    itl_p50_s: float
    server_cpu_s: float
    browser_cpu_s: float
    dashboard_updates: int


def _start_server(port: int, serve_args: list[str], log: Path) -> subprocess.Popen:
    command = [
        HAWKER,
        "serve",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--compile-warmup",
        "blocking",
        *serve_args,
    ]
    print("server:", " ".join(command), flush=True)
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise RuntimeError("the server did not become healthy in 600 s")


def _bench(url: str, num_prompts: int, rate: str, json_out: Path, seed: int = 0) -> dict[str, Any]:
    command = [HAWKER, "bench", "serve", "--url", url, "--num-prompts", str(num_prompts)]
    command += ["--request-rate", rate, "--workload-seed", str(seed), "--json-out", str(json_out)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(json_out.read_text())["results"][0]


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def _browser_processes() -> list[psutil.Process]:
    """Chromium's processes: descendants of this one (through Playwright's driver) named chrom*."""
    return [p for p in psutil.Process().children(recursive=True) if "chrom" in p.name().lower()]


@contextmanager
def _dashboard(url: str, chromium: str):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(f"{url}/dashboard")
        page.wait_for_selector("body[data-updates]", timeout=30_000)
        try:
            yield page
        finally:
            browser.close()


def _updates(page: Any) -> int:
    return int(page.get_attribute("body", "data-updates") or 0)


def _run(url: str, condition: str, index: int, args: argparse.Namespace, chromium: str) -> RunResult:
    server = psutil.Process(args.server_pid)
    json_out = args.out / f"run{index}-{condition}.json"

    def measure(page: Any | None) -> RunResult:
        browser = _browser_processes() if page is not None else []
        server_before, browser_before = _cpu_seconds([server]), _cpu_seconds(browser)
        updates_before = _updates(page) if page is not None else 0
        result = _bench(url, args.num_prompts, "inf", json_out)
        return RunResult(
            condition=condition,
            output_tok_s=result["output_throughput"],
            duration_s=result["duration_s"],
            ttft_p50_s=result["ttft_s"]["p50"],
            itl_p50_s=result["itl_s"]["p50"],
            server_cpu_s=_cpu_seconds([server]) - server_before,
            browser_cpu_s=_cpu_seconds(browser) - browser_before,
            dashboard_updates=(_updates(page) - updates_before) if page is not None else 0,
        )

    if condition == "off":
        return measure(None)
    with _dashboard(url, chromium) as page:
        return measure(page)


def _stats_call_cost(url: str, calls: int = 200) -> dict[str, float]:
    """Wall time of GET /v1/stats on the idle server: the poll the page makes each second, and its first load."""
    with httpx.Client(timeout=10) as client:
        latest = client.get(f"{url}/v1/stats").json()
        since = latest["series"][-1]["t"] if latest["series"] else None
        start = time.perf_counter()
        for _ in range(calls):
            client.get(f"{url}/v1/stats", params={"since": since} if since else None)
        poll_ms = (time.perf_counter() - start) / calls * 1e3
        start = time.perf_counter()
        full = client.get(f"{url}/v1/stats")
        full_ms = (time.perf_counter() - start) * 1e3
    return {"poll_ms": poll_ms, "full_history_ms": full_ms, "full_history_kb": len(full.content) / 1024}


def _showcase(url: str, args: argparse.Namespace, chromium: str) -> None:
    """A last run at a moderate rate, with a screenshot of the dashboard halfway through."""
    with _dashboard(url, chromium) as page:
        bench = threading.Thread(target=_bench, args=(url, 16, "0.5", args.out / "showcase.json", 7), daemon=True)
        bench.start()
        time.sleep(args.showcase_after_s)
        page.wait_for_function("document.querySelectorAll('#inflight tbody tr').length >= 1", timeout=60_000)
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.screenshot), full_page=True)
        print(f"screenshot: {args.screenshot}", flush=True)
        bench.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--order", default="off,on,on,off", help="conditions in run order (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8019)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "dashboard")
    parser.add_argument("--serve-args", default="--no-prefix-caching", help="extra `hawker serve` flags")
    parser.add_argument("--screenshot", type=Path, default=None, help="save a dashboard screenshot here")
    parser.add_argument("--showcase-after-s", type=float, default=25.0)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium is not installed: apt-get install chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{args.port}"
    server = _start_server(args.port, args.serve_args.split(), args.out / "server.log")
    args.server_pid = server.pid
    try:
        print("warm-up", flush=True)
        _bench(url, 4, "inf", args.out / "warmup.json", seed=99)
        results = []
        for index, condition in enumerate(args.order.split(",")):
            result = _run(url, condition, index, args, chromium)
            print(result, flush=True)
            results.append(result)
        cost = _stats_call_cost(url)
        if args.screenshot is not None:
            _showcase(url, args, chromium)
    finally:
        server.terminate()
        server.wait(30)
    _report(results, cost, args)
    return 0


def _report(results: list[RunResult], cost: dict[str, float], args: argparse.Namespace) -> None:
    print(
        "\n| run | browser on /dashboard | duration | output tok/s | TTFT p50 (s) | ITL p50 (ms) "
        "| server CPU (s) | browser CPU (s) | dashboard updates |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for index, r in enumerate(results):
        print(
            f"| {index + 1} | {r.condition} | {r.duration_s:.1f} s | {r.output_tok_s:.1f} | {r.ttft_p50_s:.2f} "
            f"| {r.itl_p50_s * 1e3:.0f} | {r.server_cpu_s:.1f} | {r.browser_cpu_s:.1f} | {r.dashboard_updates} |"
        )
    by = {c: [r.output_tok_s for r in results if r.condition == c] for c in ("off", "on")}
    if by["off"] and by["on"]:
        off, on = statistics.mean(by["off"]), statistics.mean(by["on"])
        print(f"\nmean output tok/s: off {off:.1f}, on {on:.1f} (on/off {on / off:.3f})")
    print(
        f"GET /v1/stats on the idle server: {cost['poll_ms']:.2f} ms per poll (since the last point), "
        f"{cost['full_history_ms']:.1f} ms for the full history ({cost['full_history_kb']:.0f} KiB)"
    )
    summary = {"results": [r.__dict__ for r in results], "stats_call": cost, "num_prompts": args.num_prompts}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
