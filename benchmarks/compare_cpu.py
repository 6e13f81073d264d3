"""Hawker vs its CPU peers on the default model, with the machine's limits, in one run.

Measures, in this order and with nothing else running:
  1. the limits: bf16 / fp32 ``F.linear`` GFLOP/s at the model's shapes and
     memory read bandwidth;
  2. offline throughput on the standard workload: Hawker (``LLM``, defaults,
     bfloat16) and transformers ``generate`` (bfloat16, left padding, at its
     best static batch size);
  3. single-stream decode (256 new tokens after a short prompt) and the
     prefill of a 2,000-token prompt: Hawker (bf16; int4 decode copies and
     the compiled decode step switched off one at a time, then the default)
     and llama.cpp in-process (llama-cpp-python, 2 threads,
     the same GGUF file, run in its own environment);
  4. serving: ``hawker bench serve`` against ``hawker serve`` and against
     ``python -m llama_cpp.server`` at several request rates, a fresh server
     for every (server, rate), and a PNG plot of latency against rate.
It prints one table of absolute figures, ratios and fractions of the limits,
writes everything as JSON and Markdown into ``--out-dir``, and with
``--append-results`` appends the Markdown to ``benchmarks/RESULTS.md``.

llama.cpp is never a dependency of Hawker: pass the Python of an environment
that has ``llama-cpp-python[server]`` (``--llama-cpp-python``), or
``--install-llama-cpp`` to create one in ``.peers/llama-cpp`` (builds from
source, about 4 minutes). The plot needs matplotlib (``pip install -e .[bench]``).

    .venv/bin/python benchmarks/compare_cpu.py --install-llama-cpp --append-results

The whole run takes about 40 minutes on the 2-core development machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hawker import LLM, SamplingParams
from hawker.bench.throughput import ThroughputResult, run_hawker
from hawker.bench.workload import WorkloadSpec, make_workload
from hawker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from hawker.layers.projection import ProjectionCopies
from hawker.loader.checkpoint import default_model_path, open_checkpoint
from hawker.loader.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import serve_peers
from benchmarks.compare_transformers import pick_batch_size, run_transformers
from benchmarks.matmul_peak import linear_rates, median, read_bandwidth_gb_s

ROOT = Path(__file__).resolve().parent.parent
PEER_ENV = ROOT / ".peers" / "llama-cpp"
LLAMA_CPP_VERSION = "0.3.36"
PROMPT = "Write a story about a cat."
NEW_TOKENS = 256
SECTIONS = ("offline", "single", "serve")
PREFILL_TOKENS = 2000


@dataclass(frozen=True)
class Row:
    metric: str
    hawker: float
    peer_name: str
    peer: float | None
    higher_is_better: bool
    limit_fraction: float | None = None
    limit_name: str = ""

    def ratio(self) -> float | None:
        if self.peer is None:
            return None
        return self.hawker / self.peer if self.higher_is_better else self.peer / self.hawker


def install_llama_cpp() -> Path:
    python = PEER_ENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_ENV)], check=True)
    spec = f"llama-cpp-python[server]=={LLAMA_CPP_VERSION}"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", spec], check=True)
    return python


def llama_cpp_figures(python: Path, model: Path) -> dict[str, Any]:
    probe = Path(__file__).resolve().parent / "llamacpp_probe.py"
    command = [str(python), str(probe), str(model), "--threads", str(torch.get_num_threads())]
    command += ["--prompt", PROMPT, "--new-tokens", str(NEW_TOKENS), "--prefill-tokens", str(PREFILL_TOKENS)]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _is_lookup_table(module: torch.nn.Module) -> bool:
    """An input embedding: a step reads one row of it, not the whole table."""
    return isinstance(module, VocabParallelEmbedding) and not isinstance(module, ParallelLMHead)


def weight_bytes_per_decode_step(llm: LLM) -> int:
    """Bytes of weights one decode step of one sequence reads (int4 copies where they are used)."""
    total = 0
    for module in llm.engine.runner.model.modules():
        int4 = getattr(module, "int4", None)
        weight = getattr(module, "weight", None)
        if int4 is not None:
            tensors = int4.tensors()
        elif isinstance(weight, torch.Tensor) and not _is_lookup_table(module):
            tensors = [weight]
        else:
            tensors = []
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def hawker_single_stream(llm: LLM, repeats: int = 2) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    llm.generate([PROMPT], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = llm.generate([PROMPT], params, use_tqdm=False)
        rates.append(len(out[0].outputs[0].token_ids) / (time.perf_counter() - start))
    return max(rates)


def hawker_prefill_seconds(llm: LLM, repeats: int = 2) -> float:
    """Time to first token of a 2,000-token prompt of random ids (distinct per run: no prefix-cache hit)."""
    vocab = llm.engine.config.model.vocab_size
    times = []
    for seed in range(repeats):
        rng = random.Random(1000 + seed)
        ids = [rng.randrange(100, vocab) for _ in range(PREFILL_TOKENS)]
        start = time.perf_counter()
        llm.generate([ids], SamplingParams(max_tokens=1), use_tqdm=False)
        times.append(time.perf_counter() - start)
    return min(times)


def measure_limits() -> dict[str, float]:
    bf16 = [rate for _, rate in linear_rates(torch.bfloat16)]
    fp32 = [rate for _, rate in linear_rates(torch.float32)]
    bandwidth = read_bandwidth_gb_s()
    print(f"limits: bf16 matmul {max(bf16):.0f} GFLOP/s (median {median(bf16):.0f}), ", end="")
    print(f"fp32 {max(fp32):.0f} (median {median(fp32):.0f}), memory read {bandwidth:.1f} GB/s", flush=True)
    return {"bf16_gflops": max(bf16), "fp32_gflops": max(fp32), "read_gb_s": bandwidth}


def default_eos_id() -> int:
    tokenizer = load_tokenizer(Path(open_checkpoint(None).path))
    assert tokenizer.eos_token_id is not None
    return int(tokenizer.eos_token_id)


def matmul_flops(llm: LLM, result: ThroughputResult) -> float:
    """FLOPs of the linear layers that a workload needs (attention's own FLOPs not counted).

    Every token fed to the model (prompt + output, less each request's last
    token, which is never fed back) goes through every projection; only the
    sampled rows go through the LM head.
    """
    projection, head = 0, 0
    for module in llm.engine.runner.model.modules():
        if isinstance(module, ParallelLMHead):
            head += module.weight.numel()
        elif isinstance(module, ProjectionCopies):
            projection += module.weight.numel()
    fed = result.input_tokens + result.output_tokens - result.num_requests
    return 2.0 * (projection * fed + head * result.output_tokens)


def offline_rows(args: argparse.Namespace, limits: dict[str, float], report: dict[str, Any]) -> list[Row]:
    spec = WorkloadSpec(num_prompts=args.num_prompts, seed=0)
    llm = LLM(dtype="bfloat16")
    tokenizer = llm.get_tokenizer()
    items = make_workload(spec, llm.engine.config.model.vocab_size, set(tokenizer.all_special_ids))
    hawker = run_hawker(llm, spec)
    print(hawker.summary(), flush=True)
    gflops = matmul_flops(llm, hawker) / hawker.seconds / 1e9
    del llm
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    calibration = pick_batch_size(items, pad_id)
    batch_size = max(calibration, key=calibration.__getitem__)
    peer = run_transformers(items, batch_size, pad_id)
    print(peer.summary(), flush=True)
    report["offline"] = {
        "hawker": json.loads(hawker.to_json()),
        "transformers": json.loads(peer.to_json()),
        "transformers_calibration": calibration,
        "hawker_matmul_gflops": gflops,
    }
    name = f"transformers b{batch_size}"
    return [
        Row(
            "offline output tok/s (standard workload)",
            hawker.output_tokens_per_s,
            name,
            peer.output_tokens_per_s,
            True,
            gflops / limits["bf16_gflops"],
            "bf16 matmul",
        ),
        Row("offline matmul GFLOP/s", gflops, name, None, True, gflops / limits["fp32_gflops"], "fp32 matmul"),
    ]


# Single-stream configurations: each optimisation's off switch, then the default.
SINGLE_STREAM_CONFIGS: tuple[tuple[str, dict[str, int | None]], ...] = (
    ("bf16, int4 off, eager", {"int4_decode_max_rows": 0, "compile_decode_max_rows": 0}),
    ("bf16, int4 decode, eager", {"compile_decode_max_rows": 0}),
    ("bf16, default: int4 decode + compiled", {}),
)


def single_stream_rows(peer: dict[str, Any] | None, limits: dict[str, float], report: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for label, options in SINGLE_STREAM_CONFIGS:
        start = time.perf_counter()
        llm = LLM(dtype="bfloat16", **options)
        startup = time.perf_counter() - start
        rate = hawker_single_stream(llm)
        step_bytes = weight_bytes_per_decode_step(llm)
        memory_limit = limits["read_gb_s"] * 1e9 / step_bytes
        peer_rate = peer and peer["single_stream_tok_s"]
        rows.append(
            Row(
                f"single-stream decode tok/s ({label})",
                rate,
                "llama.cpp",
                peer_rate,
                True,
                rate / memory_limit,
                "memory bandwidth",
            )
        )
        report[f"hawker_{label}"] = {
            "single_stream_tok_s": rate,
            "weight_bytes_per_step": step_bytes,
            "startup_s": startup,
        }
        if not options:
            rows.append(Row("Hawker start-up s (default, incl. compiling)", startup, "", None, False))
        if options.get("int4_decode_max_rows") == 0:
            seconds = hawker_prefill_seconds(llm)
            rows.append(
                Row(
                    f"TTFT of a {PREFILL_TOKENS}-token prompt, s",
                    seconds,
                    "llama.cpp",
                    peer and peer["prefill_s"],
                    False,
                )
            )
            report["hawker_prefill_s"] = seconds
        del llm
    return rows


def serving_rows(results: dict[str, list[dict[str, Any]]]) -> list[Row]:
    hawker, peer = results["hawker"], results.get("llama.cpp server")
    rows = []
    for index, result in enumerate(hawker):
        other = peer[index] if peer else None
        rate = float(result["request_rate"])
        rows.append(
            Row(
                f"serving output tok/s at {rate:g} req/s",
                result["output_throughput"],
                "llama.cpp server",
                other and other["output_throughput"],
                True,
            )
        )
    for quantile in ("p50", "p99"):
        top = hawker[-1]
        other = peer[-1] if peer else None
        rows.append(
            Row(
                f"serving TPOT {quantile} ms at {float(top['request_rate']):g} req/s",
                top["tpot_s"][quantile] * 1e3,
                "llama.cpp server",
                other and other["tpot_s"][quantile] * 1e3,
                False,
            )
        )
    return rows


def format_table(rows: list[Row]) -> list[str]:
    """The comparison as Markdown table lines."""
    lines = [
        "| metric | Hawker | peer | peer's figure | Hawker vs peer | Hawker's fraction of the limit |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        ratio = row.ratio()
        ratio_text = "-" if ratio is None else f"{ratio:.2f}x" + ("" if row.higher_is_better else " (lower is better)")
        peer = "-" if row.peer is None else f"{row.peer:.2f}"
        fraction = "-" if row.limit_fraction is None else f"{row.limit_fraction:.0%} of {row.limit_name}"
        lines.append(f"| {row.metric} | {row.hawker:.2f} | {row.peer_name} | {peer} | {ratio_text} | {fraction} |")
    return lines


def machine_description() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} vCPUs, {model}, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def markdown_report(report: dict[str, Any], rows: list[Row], command: str, plot: Path | None) -> str:
    limits = report["limits"]
    lines = [
        f"## CPU comparison, one run of `compare_cpu.py` ({report['date']})",
        "",
        f"Machine: {report['machine']}. Command:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Limits measured by the same run: bf16 matmul {limits['bf16_gflops']:.0f} GFLOP/s, "
        f"fp32 matmul {limits['fp32_gflops']:.0f} GFLOP/s, memory read {limits['read_gb_s']:.1f} GB/s.",
        "",
        *format_table(rows),
    ]
    if plot is not None:
        lines += ["", f"![latency against request rate]({plot.name})"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp-python", type=Path, default=None, help="python of an env with llama-cpp-python")
    parser.add_argument("--install-llama-cpp", action="store_true", help=f"create {PEER_ENV} with llama-cpp-python")
    parser.add_argument("--num-prompts", type=int, default=128, help="offline workload size (default: %(default)s)")
    parser.add_argument("--serve-prompts", type=int, default=64, help="prompts per serving run (default: %(default)s)")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="request rates, req/s")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--port", type=int, default=8019)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "out")
    parser.add_argument("--append-results", action="store_true", help="append the Markdown to benchmarks/RESULTS.md")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    command = " ".join([".venv/bin/python", "benchmarks/compare_cpu.py", *sys.argv[1:]])

    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": machine_description()}
    limits = measure_limits()
    report["limits"] = limits

    peer_python = install_llama_cpp() if args.install_llama_cpp else args.llama_cpp_python
    rows: list[Row] = []
    if "offline" in args.sections:
        rows += offline_rows(args, limits, report)
    if "single" in args.sections:
        peer = llama_cpp_figures(peer_python, default_model_path()) if peer_python else None
        report["llama_cpp"] = peer
        rows += single_stream_rows(peer, limits, report)
    plot_path = None
    if "serve" in args.sections:
        specs = [serve_peers.hawker_server(args.port)]
        if peer_python:
            threads = torch.get_num_threads()
            specs.append(serve_peers.llama_cpp_server(peer_python, default_model_path(), args.port, threads))
        eos_id = default_eos_id()
        results = serve_peers.sweep(specs, args.rates, args.serve_prompts, eos_id, args.out_dir, args.port)
        report["serving"] = results
        rows += serving_rows(results)
        plot_path = args.out_dir / "cpu_serve_latency_vs_rate.png"
        serve_peers.plot(results, plot_path)

    print("\n".join(format_table(rows)))
    (args.out_dir / "compare_cpu.json").write_text(json.dumps(report, indent=2, default=str))
    markdown = markdown_report(report, rows, command, plot_path)
    (args.out_dir / "compare_cpu.md").write_text(markdown)
    if args.append_results:
        if plot_path is not None:
            shutil.copy(plot_path, ROOT / "benchmarks" / plot_path.name)
        with (ROOT / "benchmarks" / "RESULTS.md").open("a") as results_file:
            results_file.write("\n" + markdown)


if __name__ == "__main__":
    main()
