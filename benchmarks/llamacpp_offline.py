"""llama.cpp (llama-cpp-python, in-process) on the comparison's workloads; writes one JSON file.

Runs inside the peer's own environment (``.peers/llama-cpp``), started by
``benchmarks/compare_cpu.py``:

    PEER_PYTHON benchmarks/llamacpp_offline.py MODEL.gguf JOB.json OUT.json --threads 2 --budget-s 180

llama-cpp-python's ``Llama`` runs one sequence at a time: it is no batch
engine, so a workload's requests run one after another, in the workload's
order, greedy, each to exactly its output length (EOS banned with a -100
logit bias). It keeps the previous request's tokens in its KV cache and
reuses the common prefix (the shared-prefix workload's system prompt).
Since a sequential run of the larger workloads takes a long time, each
workload stops starting new requests after ``--budget-s`` seconds; its
figures are then those of the requests it finished (the count is in the
output): the requests are in random order, so their rate stands for the
whole workload's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from llama_cpp import Llama


def one(llm: Llama, item: dict[str, Any]) -> int:
    out = llm.create_completion(
        item["prompt_token_ids"],
        max_tokens=item["output_len"],
        temperature=0.0,
        logit_bias={llm.token_eos(): -100.0},
    )
    return int(out["usage"]["completion_tokens"])


def run(llm: Llama, items: list[dict[str, Any]], budget_s: float) -> dict[str, Any]:
    start = time.perf_counter()
    done = output_tokens = input_tokens = 0
    for item in items:
        if done and time.perf_counter() - start > budget_s:  # at least one request
            break
        output_tokens += one(llm, item)
        input_tokens += len(item["prompt_token_ids"])
        done += 1
    seconds = time.perf_counter() - start
    return {
        "engine": "llama.cpp",
        "num_requests": done,
        "workload_requests": len(items),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "seconds": seconds,
        "output_tokens_per_s": output_tokens / seconds,
        "total_tokens_per_s": (input_tokens + output_tokens) / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("job", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=180.0, help="per workload")
    args = parser.parse_args()
    job = json.loads(args.job.read_text())
    longest = max(
        len(item["prompt_token_ids"]) + item["output_len"] for items in job["workloads"].values() for item in items
    )
    llm = Llama(
        model_path=args.model,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_ctx=max(2048, longest + 16),
        n_batch=512,
        verbose=False,
    )
    for item in job.get("warmup") or []:
        one(llm, item)
    report: dict[str, Any] = {"budget_s": args.budget_s, "workloads": {}}
    for name, items in job["workloads"].items():
        report["workloads"][name] = result = run(llm, items, args.budget_s)
        print(f"llama.cpp: {name}: {result['num_requests']}/{len(items)} requests, ", end="")
        print(f"{result['output_tokens_per_s']:.1f} output tok/s", flush=True)
        args.out.write_text(json.dumps(report, indent=2))
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
