"""Command line: `hawker generate | chat | bench throughput`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from hawker.engine.engine import EngineOptions


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    defaults = EngineOptions()
    parser.add_argument("--model", default=None, help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default=defaults.dtype, choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=defaults.block_size)
    parser.add_argument("--kv-cache-memory-gb", type=float, default=defaults.kv_cache_memory_gb)
    parser.add_argument("--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens)
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--seed", type=int, default=defaults.seed)


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "dtype": args.dtype,
        "max_model_len": args.max_model_len,
        "block_size": args.block_size,
        "kv_cache_memory_gb": args.kv_cache_memory_gb,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_num_seqs": args.max_num_seqs,
        "enable_prefix_caching": not args.no_prefix_caching,
        "seed": args.seed,
    }


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--sampling-seed", type=int, default=None)


def _sampling(args: argparse.Namespace) -> Any:
    from hawker.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.sampling_seed,
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    from hawker.llm import LLM

    llm = LLM(args.model, **_engine_kwargs(args))
    params = _sampling(args)
    if args.chat:
        outputs = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
    else:
        outputs = llm.generate(args.prompt, params, use_tqdm=False)
    print(outputs[0].outputs[0].text)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from hawker.llm import LLM

    llm = LLM(args.model, **_engine_kwargs(args))
    params = _sampling(args)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("Chatting with the model. Empty line or Ctrl-D to quit.")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        reply = llm.chat(history, params, use_tqdm=False)[0].outputs[0].text
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}")
    return 0


def _cmd_bench_throughput(args: argparse.Namespace) -> int:
    from hawker.bench.throughput import run_hawker
    from hawker.bench.workload import WorkloadSpec
    from hawker.llm import LLM

    llm = LLM(args.model, **_engine_kwargs(args))
    spec = WorkloadSpec(num_prompts=args.num_prompts, seed=args.workload_seed)
    result = run_hawker(llm, spec)
    print(result.summary())
    print(result.to_json())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hawker", description="Hawker LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a completion for one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_engine_args(gen)
    _add_sampling_args(gen)
    gen.set_defaults(func=_cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat in the terminal")
    chat.add_argument("--system", default=None)
    _add_engine_args(chat)
    _add_sampling_args(chat)
    chat.set_defaults(func=_cmd_chat, temperature=0.7)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    tp = bench_sub.add_parser("throughput", help="offline throughput on the standard workload")
    tp.add_argument("--num-prompts", type=int, default=128)
    tp.add_argument("--workload-seed", type=int, default=0)
    _add_engine_args(tp)
    tp.set_defaults(func=_cmd_bench_throughput)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
