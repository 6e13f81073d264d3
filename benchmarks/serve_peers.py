"""Hawker's server, vLLM CPU's and llama.cpp's (``python -m llama_cpp.server``) under the same load.

Each (server, rate) pair gets a freshly started server, so that no rate is
served from a prefix cache warmed by the previous one, and the load comes
from ``hawker bench serve``: the standard workload's prompts as text (the
llama.cpp server takes no token-id prompts; every server tokenizes them
with the same tokenizer), greedy, every request running to
its ``max_tokens`` (``ignore_eos`` plus a -100 logit bias on EOS, which
llama.cpp honours).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.peers import vllm_env

ROOT = Path(__file__).resolve().parent.parent
HAWKER = Path(sys.executable).parent / "hawker"


@dataclass(frozen=True)
class ServerSpec:
    name: str
    command: list[str]
    ready_path: str  # answers 200 once the model is loaded
    env: dict[str, str] | None = None  # None: this process's
    startup_s: float = 300.0


def hawker_server(port: int) -> ServerSpec:
    # Compiled before it listens: the sweep measures full speed, not the background warm-up.
    command = [str(HAWKER), "serve", "--port", str(port), "--log-level", "warning", "--compile-warmup", "blocking"]
    return ServerSpec("hawker", command, "/health")


def llama_cpp_server(python: Path, model: Path, port: int, threads: int) -> ServerSpec:
    command = [str(python), "-m", "llama_cpp.server", "--model", str(model), "--port", str(port)]
    command += ["--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "2048"]
    # By default a new request interrupts the one being streamed (a
    # single-user server); under load that fails requests, so queue them.
    command += ["--interrupt_requests", "False"]
    return ServerSpec("llama.cpp server", command, "/v1/models")


def vllm_server(python: Path, model_dir: Path, port: int) -> ServerSpec:
    """vLLM CPU's OpenAI server (its ``vllm serve`` entry point fails on the package's name: run the module).

    It compiles at every start: 2-3 minutes before it answers.
    """
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    command += ["--dtype", "bfloat16", "--host", "127.0.0.1", "--port", str(port)]
    return ServerSpec("vLLM CPU server", command, "/v1/models", env=vllm_env(python), startup_s=600.0)


@contextmanager
def running(spec: ServerSpec, port: int, log: Path) -> Iterator[str]:
    """Start the server, wait until it answers, yield its URL, stop it."""
    url = f"http://127.0.0.1:{port}"
    _check_port_free(port)
    with log.open("w") as out:
        # A session of its own: the server's worker processes (vLLM's engine
        # core) are stopped with it.
        process = subprocess.Popen(
            spec.command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=spec.env, start_new_session=True
        )
    try:
        _wait_ready(process, url + spec.ready_path, spec.startup_s, log)
        yield url
    finally:
        _stop(process)


def _check_port_free(port: int) -> None:
    """A server left on the port would answer the readiness check for the new one."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise RuntimeError(f"port {port} is already in use; stop what listens there or pass another --port")


def _stop(process: subprocess.Popen[bytes]) -> None:
    for sig, wait_s in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        with suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


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
    figure.suptitle("Serving the default model on this CPU: " + " vs ".join(results))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
