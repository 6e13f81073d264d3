"""Hawker vs transformers on a GPU, with random-weight models of real sizes (issue 5).

    .venv/bin/python benchmarks/gpu_bench.py --append-results     # on a CUDA machine, everything
    .venv/bin/python benchmarks/gpu_bench.py --tiny --num-prompts 4  # a smoke test, on CPU too

For each model (Qwen3-0.6B- and Llama-3-8B-shaped, built from their configs
with random weights: nothing is downloaded) it measures, in one run:
  - Hawker offline throughput on the standard workload scaled to a GPU:
    256 prompts, prompt and output lengths uniform in 100-1024, ignore_eos;
  - transformers ``generate`` (left-padded static batches) on the same items;
  - single-stream decode (256 new tokens) against the memory-bandwidth limit:
    the weights' bytes over the device's measured copy bandwidth.
On CUDA the Hawker runs are repeated with CUDA graphs off
(``cuda_graph_max_batch_size=0``) for the graphs' speed-up, and the graphs'
capture time at start-up is printed, and once more with overlap scheduling
off (``overlap_scheduling=False``) for its speed-up.
The KV cache is sized from free memory (``gpu_memory_utilization`` 0.9)
unless ``--kv-cache-memory-gb`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from hawker import LLM, SamplingParams
from hawker.bench.throughput import ThroughputResult, run_hawker
from hawker.bench.workload import WorkItem, WorkloadSpec, make_workload
from hawker.engine.configure import resolve_device

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.compare_cpu import weight_bytes_per_decode_step  # noqa: E402
from benchmarks.compare_transformers import hf_generate_batch  # noqa: E402

# Shapes from the models' published config.json files.
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3-0.6b": (
        "qwen3",
        {
            "hidden_size": 1024,
            "intermediate_size": 3072,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 151936,
            "tie_word_embeddings": True,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 40960,
        },
    ),
    "llama3-8b": (
        "llama",
        {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 128256,
            "tie_word_embeddings": False,
            "rope_theta": 500000.0,
            "max_position_embeddings": 8192,
        },
    ),
}
# --tiny: the same families, small enough for a CPU smoke test.
TINY = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 1024,
}
SINGLE_STREAM_TOKENS = 256


@dataclass(frozen=True)
class HawkerRun:
    offline: ThroughputResult
    single_stream_tok_s: float
    graph_capture_s: float | None  # None when CUDA graphs were off


@dataclass(frozen=True)
class ModelFigures:
    name: str
    hawker: ThroughputResult
    transformers: ThroughputResult
    single_stream_tok_s: float
    weight_bytes: int
    copy_gb_s: float
    graph_capture_s: float | None
    # The same Hawker runs without CUDA graphs, and without overlap scheduling (None without CUDA).
    eager: HawkerRun | None
    sequential: HawkerRun | None

    def graph_speedups(self) -> str:
        if self.eager is None:
            return "n/a (no CUDA)"
        return f"{self._speedups(self.eager)} (capture {self.graph_capture_s:.1f} s)"

    def overlap_speedups(self) -> str:
        return "n/a (no CUDA)" if self.sequential is None else self._speedups(self.sequential)

    def _speedups(self, without: HawkerRun) -> str:
        offline = self.hawker.output_tokens_per_s / without.offline.output_tokens_per_s
        single = self.single_stream_tok_s / without.single_stream_tok_s
        return f"{offline:.2f}x offline, {single:.2f}x single stream"

    @property
    def bandwidth_limit_tok_s(self) -> float:
        return self.copy_gb_s * 1e9 / self.weight_bytes


def build_checkpoint(family: str, shape: dict[str, Any], directory: Path, device: str) -> Path:
    """Random bf16 weights (std 0.02) and a word-level tokenizer covering the vocabulary."""
    config = AutoConfig.for_model(family, **shape, initializer_range=0.02, bos_token_id=1, eos_token_id=2)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    del model
    _empty_cache(device)
    vocab = {f"t{i}": i for i in range(shape["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="t1", eos_token="t2", unk_token="t0")
    fast.save_pretrained(directory)
    return directory


def copy_bandwidth_gb_s(device: str, megabytes: int = 1024, repeats: int = 10) -> float:
    """Bytes read plus written per second by a device-to-device copy (the best of ``repeats``)."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() / best / 1e9


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def hawker_single_stream(llm: LLM) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=SINGLE_STREAM_TOKENS, ignore_eos=True)
    prompt = list(range(3, 35))
    llm.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    start = time.perf_counter()
    out = llm.generate([prompt], params, use_tqdm=False)
    return len(out[0].outputs[0].token_ids) / (time.perf_counter() - start)


def transformers_throughput(directory: Path, items: list[WorkItem], batch_size: int, device: str) -> ThroughputResult:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).to(device).eval()
    hf_generate_batch(model, items[:2], 0, device)  # warm-up
    _synchronize(device)
    start = time.perf_counter()
    produced = sum(
        hf_generate_batch(model, items[first : first + batch_size], 0, device)
        for first in range(0, len(items), batch_size)
    )
    _synchronize(device)
    return ThroughputResult(
        engine=f"transformers (batch {batch_size})",
        num_requests=len(items),
        input_tokens=sum(len(item.prompt_token_ids) for item in items),
        output_tokens=produced,
        seconds=time.perf_counter() - start,
    )


def run_hawker_engine(
    name: str, directory: Path, spec: WorkloadSpec, device: str, options: dict[str, Any]
) -> tuple[HawkerRun, int]:
    """Offline throughput and single-stream speed of one Hawker engine; also the decode step's weight bytes."""
    llm = LLM(str(directory), dtype="bfloat16", device=device, **options)
    graphs = llm.engine.runner.decode_graphs
    offline = run_hawker(llm, spec)
    print(f"{name} {options}: {offline.summary()}", flush=True)
    run = HawkerRun(offline, hawker_single_stream(llm), None if graphs is None else graphs.capture_seconds)
    weight_bytes = weight_bytes_per_decode_step(llm)
    del llm
    _empty_cache(device)
    return run, weight_bytes


def measure_model(name: str, args: argparse.Namespace, device: str, copy_gb_s: float) -> ModelFigures:
    family, shape = MODELS[name]
    shape = {**shape, **TINY} if args.tiny else shape
    spec = WorkloadSpec(num_prompts=args.num_prompts, min_input=100, max_input=1024, min_output=100, max_output=1024)
    options: dict[str, Any] = {"kv_cache_memory_gb": args.kv_cache_memory_gb}
    with tempfile.TemporaryDirectory(prefix=f"hawker-{name}-") as tmp:
        directory = build_checkpoint(family, shape, Path(tmp), device)
        best, weight_bytes = run_hawker_engine(name, directory, spec, device, options)
        eager = sequential = None
        if torch.device(device).type == "cuda":
            eager, _ = run_hawker_engine(name, directory, spec, device, {**options, "cuda_graph_max_batch_size": 0})
            sequential, _ = run_hawker_engine(name, directory, spec, device, {**options, "overlap_scheduling": False})
        items = make_workload(spec, shape["vocab_size"], {0, 1, 2})
        peer = transformers_throughput(directory, items, args.transformers_batch, device)
        print(f"{name}: {peer.summary()}", flush=True)
        _empty_cache(device)
    return ModelFigures(
        name,
        best.offline,
        peer,
        best.single_stream_tok_s,
        weight_bytes,
        copy_gb_s,
        best.graph_capture_s,
        eager,
        sequential,
    )


def _empty_cache(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def table(figures: list[ModelFigures]) -> list[str]:
    lines = [
        "| model | Hawker offline output tok/s | transformers | Hawker vs transformers "
        "| single-stream tok/s | bandwidth limit tok/s | fraction | CUDA graphs speed-up | overlap speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for f in figures:
        ratio = f.hawker.output_tokens_per_s / f.transformers.output_tokens_per_s
        fraction = f.single_stream_tok_s / f.bandwidth_limit_tok_s
        lines.append(
            f"| {f.name} | {f.hawker.output_tokens_per_s:.1f} | {f.transformers.output_tokens_per_s:.1f} "
            f"({f.transformers.engine}) | {ratio:.2f}x | {f.single_stream_tok_s:.1f} | "
            f"{f.bandwidth_limit_tok_s:.1f} | {fraction:.0%} | {f.graph_speedups()} | {f.overlap_speedups()} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", help="small models of the same families (smoke test)")
    parser.add_argument(
        "--kv-cache-memory-gb", type=float, default=None, help="default: sized from free GPU memory (2 GiB on CPU)"
    )
    parser.add_argument("--transformers-batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "gpu_bench.json")
    parser.add_argument("--append-results", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    copy_gb_s = copy_bandwidth_gb_s(device)
    print(f"device {device}: copy bandwidth {copy_gb_s:.0f} GB/s (read + write)", flush=True)
    figures = [measure_model(name, args, device, copy_gb_s) for name in args.models]
    lines = table(figures)
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        f.name: {
            "hawker": json.loads(f.hawker.to_json()),
            "transformers": json.loads(f.transformers.to_json()),
            "single_stream_tok_s": f.single_stream_tok_s,
            "weight_bytes": f.weight_bytes,
            "graph_capture_s": f.graph_capture_s,
            "without_cuda_graphs": None
            if f.eager is None
            else {
                "hawker": json.loads(f.eager.offline.to_json()),
                "single_stream_tok_s": f.eager.single_stream_tok_s,
            },
            "without_overlap_scheduling": None
            if f.sequential is None
            else {
                "hawker": json.loads(f.sequential.offline.to_json()),
                "single_stream_tok_s": f.sequential.single_stream_tok_s,
            },
        }
        for f in figures
    }
    args.out.write_text(
        json.dumps({"device": _device_name(device), "copy_gb_s": copy_gb_s, "models": report}, indent=2)
    )
    if args.append_results:
        _append_results(lines, device, copy_gb_s)


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "CPU"


def _append_results(lines: list[str], device: str, copy_gb_s: float) -> None:
    header = [
        "",
        f"## GPU benchmark, `benchmarks/gpu_bench.py` ({time.strftime('%Y-%m-%d')})",
        "",
        f"Device: {_device_name(device)}; copy bandwidth {copy_gb_s:.0f} GB/s. Command:",
        "",
        "```bash",
        ".venv/bin/python benchmarks/gpu_bench.py --append-results",
        "```",
        "",
    ]
    with (ROOT / "benchmarks" / "RESULTS.md").open("a") as results:
        results.write("\n".join(header + lines) + "\n")


if __name__ == "__main__":
    main()
