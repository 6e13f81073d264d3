"""Measures llama.cpp (llama-cpp-python) on one GGUF; prints one JSON object.

Runs inside the peer's own environment (never Hawker's), started by
``benchmarks/compare_cpu.py``:

    PEER_PYTHON benchmarks/llamacpp_probe.py MODEL.gguf --threads 2
"""

from __future__ import annotations

import argparse
import json
import random
import time

from llama_cpp import Llama


def single_stream(llm: Llama, prompt: str, new_tokens: int) -> float:
    """Output tokens/s of one greedy request that may not stop early."""
    start = time.perf_counter()
    out = llm.create_completion(prompt, max_tokens=new_tokens, temperature=0.0, logit_bias={llm.token_eos(): -100.0})
    seconds = time.perf_counter() - start
    return out["usage"]["completion_tokens"] / seconds


def prefill_seconds(llm: Llama, length: int, seed: int) -> float:
    """Seconds to evaluate ``length`` random prompt tokens from an empty context."""
    rng = random.Random(seed)
    ids = [rng.randrange(100, llm.n_vocab()) for _ in range(length)]
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", default="Write a story about a cat.")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prefill-tokens", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    llm = Llama(
        model_path=args.model,
        n_threads=args.threads,
        n_ctx=max(2048, args.prefill_tokens + 16),
        n_batch=512,
        verbose=False,
    )
    single_stream(llm, args.prompt, 8)  # warm-up
    decode = [single_stream(llm, args.prompt, args.new_tokens) for _ in range(args.repeats)]
    # --prefill-tokens 0: decode only (the alternating single-stream rounds of compare_cpu.py)
    prefill = [
        prefill_seconds(llm, args.prefill_tokens, seed) for seed in range(args.repeats if args.prefill_tokens else 0)
    ]
    prefill_s = min(prefill) if prefill else None
    print(json.dumps({"single_stream_tok_s": max(decode), "prefill_s": prefill_s, "threads": args.threads}))


if __name__ == "__main__":
    main()
