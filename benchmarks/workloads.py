"""Offline throughput of every engine on the named workloads (``hawker.bench.workload.WORKLOADS``).

The prompts are made once, in Hawker's process, from each workload's seed
and the default model's vocabulary (no special tokens), and every engine
gets exactly those token ids: Hawker's ``LLM`` in-process, vLLM CPU and
llama.cpp in their own environments through a JSON job file, transformers
in-process. Each engine is loaded once and runs all the workloads in the
same order, greedy, every request running to exactly its output length.
A warm-up of prompts outside every workload (their own seed: no prefix-cache
hit on a workload's prompts) runs before the first timed workload.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from hawker import LLM, SamplingParams
from hawker.bench.throughput import ThroughputResult
from hawker.bench.workload import WORKLOADS, WorkItem, WorkloadSpec, make_workload, shrunk

WARMUP = WorkloadSpec(num_prompts=2, min_input=16, max_input=32, min_output=16, max_output=16, seed=12345)
QUICK_DIVISOR = 32


def workload_specs(names: list[str], quick: bool) -> dict[str, WorkloadSpec]:
    return {name: shrunk(WORKLOADS[name], QUICK_DIVISOR) if quick else WORKLOADS[name] for name in names}


def make_items(specs: dict[str, WorkloadSpec], vocab_size: int, special_ids: set[int]) -> dict[str, list[WorkItem]]:
    return {name: make_workload(spec, vocab_size, special_ids) for name, spec in specs.items()}


def result(engine: str, items: list[WorkItem], output_tokens: int, seconds: float) -> ThroughputResult:
    return ThroughputResult(
        engine=engine,
        num_requests=len(items),
        input_tokens=sum(len(item.prompt_token_ids) for item in items),
        output_tokens=output_tokens,
        seconds=seconds,
    )


def result_from_dict(data: dict[str, Any]) -> ThroughputResult:
    return ThroughputResult(**{key: data[key] for key in ThroughputResult.__dataclass_fields__})


def result_dict(value: ThroughputResult) -> dict[str, Any]:
    return json.loads(value.to_json())


# --- Hawker -----------------------------------------------------------------


def hawker_run(llm: LLM, items: list[WorkItem]) -> ThroughputResult:
    """One ``generate`` call over the whole workload (as ``hawker bench throughput`` times it)."""
    prompts = [item.prompt_token_ids for item in items]
    params = [SamplingParams(temperature=0.0, max_tokens=item.output_len, ignore_eos=True) for item in items]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return result("hawker", items, sum(len(out.outputs[0].token_ids) for out in outputs), seconds)


def hawker_workloads(
    llm: LLM, workloads: dict[str, list[WorkItem]], warmup: list[WorkItem]
) -> dict[str, ThroughputResult]:
    hawker_run(llm, warmup)
    results = {}
    for name, items in workloads.items():
        results[name] = hawker_run(llm, items)
        print(f"  {name}: {results[name].summary()}", flush=True)
    return results


# --- transformers -------------------------------------------------------------


def transformers_workloads(
    workloads: dict[str, list[WorkItem]], warmup: list[WorkItem], pad_id: int, batch_size: int
) -> dict[str, ThroughputResult]:
    """transformers ``generate`` in static left-padded batches of ``batch_size`` (bfloat16)."""
    from benchmarks.compare_transformers import _load_hf_model, hf_generate_batch

    model = _load_hf_model()
    hf_generate_batch(model, warmup, pad_id)
    results = {}
    for name, items in workloads.items():
        start = time.perf_counter()
        produced = sum(
            hf_generate_batch(model, items[first : first + batch_size], pad_id)
            for first in range(0, len(items), batch_size)
        )
        results[name] = result(f"transformers (batch {batch_size})", items, produced, time.perf_counter() - start)
        print(f"  {name}: {results[name].summary()}", flush=True)
    return results


# --- peers in their own environments ------------------------------------------


def _item_dicts(items: list[WorkItem]) -> list[dict[str, Any]]:
    return [asdict(item) for item in items]


def write_job(
    path: Path,
    workloads: dict[str, list[WorkItem]],
    warmup: list[WorkItem],
    single_stream: WorkItem | None = None,
) -> None:
    job: dict[str, Any] = {
        "workloads": {name: _item_dicts(items) for name, items in workloads.items()},
        "warmup": _item_dicts(warmup),
        "single_stream": asdict(single_stream) if single_stream else None,
    }
    path.write_text(json.dumps(job))


def run_peer_script(command: list[str], out: Path, log: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a peer's script (its output JSON in ``out``, its chatter in ``log``); returns the JSON."""
    start = time.perf_counter()
    with log.open("w") as log_file:
        done = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{command[1]} failed ({done.returncode}); see {log}:\n{tail}")
    report = json.loads(out.read_text())
    report["process_s"] = time.perf_counter() - start
    return report


# --- plot --------------------------------------------------------------------


def plot(results: dict[str, dict[str, ThroughputResult]], path: Path) -> None:
    """Grouped bars: output and total tokens/s per workload, one bar per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = list(results)
    names = list(dict.fromkeys(name for per_engine in results.values() for name in per_engine))
    width = 0.8 / max(1, len(engines))
    figure, axes = plt.subplots(2, 1, figsize=(max(8.0, 1.6 * len(names)), 8))
    for axis, (title, attribute) in zip(
        axes, (("output tokens/s", "output_tokens_per_s"), ("total tokens/s", "total_tokens_per_s")), strict=True
    ):
        for index, engine in enumerate(engines):
            xs = [position + (index - (len(engines) - 1) / 2) * width for position in range(len(names))]
            values = [getattr(results[engine][name], attribute) if name in results[engine] else 0.0 for name in names]
            bars = axis.bar(xs, values, width, label=engine)
            axis.bar_label(bars, fmt="%.0f", fontsize=7)
        axis.set_xticks(range(len(names)), names)
        axis.set_ylabel(title)
        axis.grid(axis="y", alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"Offline throughput per workload, default model, bfloat16, {torch.get_num_threads()} threads")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
