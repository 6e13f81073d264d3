"""Hawker vs its CPU peers on the default model, with the machine's limits, in one run.

Measures, in this order and with nothing else running:
  1. the limits: bf16 / fp32 ``F.linear`` GFLOP/s at the model's shapes and
     memory read bandwidth;
  2. single-stream decode (256 new tokens after a short prompt) and the
     prefill of a 2,000-token prompt: Hawker (bf16; with and without int4
     decode copies) and llama.cpp in-process (llama-cpp-python, 2 threads,
     the same GGUF file, run in its own environment);
It prints one table of absolute figures, ratios and fractions of the limits.

llama.cpp is never a dependency of Hawker: pass the Python of an environment
that has ``llama-cpp-python`` (``--llama-cpp-python``), or ``--install-llama-cpp``
to create one in ``.peers/llama-cpp`` (builds from source, about 4 minutes).

    .venv/bin/python benchmarks/compare_cpu.py --install-llama-cpp [--json-out F]

Not yet here (issue 4 is open): the offline throughput comparison still runs
separately (``compare_transformers.py``), and the server comparison against
``llama_cpp.server`` is still to come.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hawker import LLM, SamplingParams
from hawker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from hawker.loader.checkpoint import default_model_path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.matmul_peak import linear_rates, median, read_bandwidth_gb_s

ROOT = Path(__file__).resolve().parent.parent
PEER_ENV = ROOT / ".peers" / "llama-cpp"
LLAMA_CPP_VERSION = "0.3.36"
PROMPT = "Write a story about a cat."
NEW_TOKENS = 256
PREFILL_TOKENS = 2000


@dataclass(frozen=True)
class Row:
    metric: str
    hawker: float
    peer_name: str
    peer: float | None
    higher_is_better: bool
    limit_fraction: float | None = None

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
            tensors = [int4.packed, int4.scales_and_zeros]
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


def print_table(rows: list[Row]) -> None:
    print(f"{'metric':48s} {'hawker':>10s} {'peer':>28s} {'ratio':>7s} {'of limit':>9s}")
    for row in rows:
        peer = "-" if row.peer is None else f"{row.peer_name} {row.peer:.2f}"
        ratio = row.ratio()
        ratio_text = "-" if ratio is None else f"{ratio:.2f}x"
        fraction = "-" if row.limit_fraction is None else f"{row.limit_fraction:.0%}"
        print(f"{row.metric:48s} {row.hawker:10.2f} {peer:>28s} {ratio_text:>7s} {fraction:>9s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp-python", type=Path, default=None, help="python of an env with llama-cpp-python")
    parser.add_argument("--install-llama-cpp", action="store_true", help=f"create {PEER_ENV} with llama-cpp-python")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    bf16 = [rate for _, rate in linear_rates(torch.bfloat16)]
    fp32 = [rate for _, rate in linear_rates(torch.float32)]
    bandwidth = read_bandwidth_gb_s()
    report["limits"] = {"bf16_gflops": max(bf16), "fp32_gflops": max(fp32), "read_gb_s": bandwidth}
    print(f"limits: bf16 matmul {max(bf16):.0f} GFLOP/s (median {median(bf16):.0f}), ", end="")
    print(f"fp32 {max(fp32):.0f} (median {median(fp32):.0f}), memory read {bandwidth:.1f} GB/s", flush=True)

    peer_python = install_llama_cpp() if args.install_llama_cpp else args.llama_cpp_python
    peer = llama_cpp_figures(peer_python, default_model_path()) if peer_python else None
    report["llama_cpp"] = peer

    rows: list[Row] = []
    for rows_limit, label in ((0, "bf16"), (8, "bf16 + int4 decode")):
        llm = LLM(dtype="bfloat16", int4_decode_max_rows=rows_limit)
        rate = hawker_single_stream(llm)
        step_bytes = weight_bytes_per_decode_step(llm)
        memory_limit = bandwidth * 1e9 / step_bytes
        rows.append(
            Row(
                f"single-stream decode tok/s ({label})",
                rate,
                "llama.cpp",
                peer and peer["single_stream_tok_s"],
                True,
                rate / memory_limit,
            )
        )
        report[f"hawker_{label}"] = {"single_stream_tok_s": rate, "weight_bytes_per_step": step_bytes}
        if rows_limit == 0:
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

    print_table(rows)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
