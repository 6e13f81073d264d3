"""Hawker's server and llama.cpp's (``python -m llama_cpp.server``) under the same load.

Each (server, rate) pair gets a freshly started server, so that no rate is
served from a prefix cache warmed by the previous one, and the load comes
from ``hawker bench serve``: the standard workload's prompts as text (the
llama.cpp server takes no token-id prompts), greedy, every request running to
its ``max_tokens`` (``ignore_eos`` plus a -100 logit bias on EOS, which
llama.cpp honours).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
HAWKER = Path(sys.executable).parent / "hawker"


@dataclass(frozen=True)
class ServerSpec:
    name: str
    command: list[str]
    ready_path: str  # answers 200 once the model is loaded


def hawker_server(port: int) -> ServerSpec:
    command = [str(HAWKER), "serve", "--port", str(port), "--log-level", "warning"]
    return ServerSpec("hawker", command, "/health")


def llama_cpp_server(python: Path, model: Path, port: int, threads: int) -> ServerSpec:
    command = [str(python), "-m", "llama_cpp.server", "--model", str(model), "--port", str(port)]
    command += ["--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "2048"]
    # By default a new request interrupts the one being streamed (a
    # single-user server); under load that fails requests, so queue them.
    command += ["--interrupt_requests", "False"]
    return ServerSpec("llama.cpp server", command, "/v1/models")


@contextmanager
def running(spec: ServerSpec, port: int, log: Path, startup_s: float = 300.0) -> Iterator[str]:
    """Start the server, wait until it answers, yield its URL, stop it."""
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        process = subprocess.Popen(spec.command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        _wait_ready(process, url + spec.ready_path, startup_s, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(process: subprocess.Popen[bytes], url: str, startup_s: float, log: Path) -> None:
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}; see {log}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"server not ready after {startup_s:.0f} s; see {log}")


def bench_serve(url: str, rate: float, num_prompts: int, eos_id: int, json_out: Path) -> dict[str, Any]:
    """One ``hawker bench serve`` run; returns its result for the rate."""
    command = [str(HAWKER), "bench", "serve", "--url", url, "--num-prompts", str(num_prompts)]
    command += ["--request-rate", str(rate), "--text-prompts", "--ban-token-id", str(eos_id)]
    command += ["--json-out", str(json_out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    print(done.stdout, end="", flush=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench serve failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(json_out.read_text())["results"][0]


def sweep(
    specs: list[ServerSpec], rates: list[float], num_prompts: int, eos_id: int, out_dir: Path, port: int
) -> dict[str, list[dict[str, Any]]]:
    """Every server at every rate, one fresh server each time; {server name: results by rate}."""
    results: dict[str, list[dict[str, Any]]] = {spec.name: [] for spec in specs}
    for rate in rates:
        for spec in specs:
            slug = spec.name.replace(" ", "-").replace(".", "")
            print(f"== {spec.name} at {rate:g} req/s", flush=True)
            with running(spec, port, out_dir / f"{slug}-{rate:g}.log") as url:
                json_out = out_dir / f"serve-{slug}-{rate:g}.json"
                results[spec.name].append(bench_serve(url, rate, num_prompts, eos_id, json_out))
    return results


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Throughput, TTFT, TPOT and end-to-end latency against request rate, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("output tokens/s", "output_throughput", None, 1.0),
        ("TTFT (s)", "ttft_s", ("p50", "p99"), 1.0),
        ("TPOT (ms)", "tpot_s", ("p50", "p99"), 1e3),
        ("end-to-end latency (s)", "e2e_s", ("p50", "p99"), 1.0),
    )
    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, (title, key, quantiles, scale) in zip(axes.flat, panels, strict=True):
        for color, (server, rows) in zip(colors, results.items(), strict=False):  # more colors than servers
            rates = [float(row["request_rate"]) for row in rows]
            if quantiles is None:
                axis.plot(rates, [row[key] * scale for row in rows], color=color, marker="o", label=server)
                continue
            for quantile, style in zip(quantiles, ("-", "--"), strict=True):
                values = [row[key][quantile] * scale for row in rows]
                axis.plot(rates, values, style, color=color, marker="o", label=f"{server} {quantile}")
        if quantiles is not None:
            # Latencies of the two servers differ by orders of magnitude.
            axis.set_yscale("log")
        axis.set_title(title)
        axis.set_xlabel("request rate (req/s, Poisson)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle("Serving the default model on this CPU: hawker serve vs llama_cpp.server")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
