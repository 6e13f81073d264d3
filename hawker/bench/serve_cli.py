"""`hawker bench serve`: its arguments and command (the rest of the CLI is hawker/cli.py)."""

from __future__ import annotations

import argparse
import math
import os


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    import asyncio
    import json
    from pathlib import Path

    from hawker.bench.serve import ServeBenchConfig, load_dataset, run_serve_bench
    from hawker.bench.workload import WorkloadSpec, make_workload

    if args.dataset:
        items: list = load_dataset(Path(args.dataset))
    else:
        from hawker.loader.checkpoint import open_checkpoint
        from hawker.loader.tokenizer import load_tokenizer

        # Random token-id prompts need the server's vocabulary: read it from the tokenizer.
        tokenizer = load_tokenizer(Path(open_checkpoint(args.tokenizer).path))
        spec = WorkloadSpec(num_prompts=args.num_prompts, seed=args.workload_seed)
        items = make_workload(spec, len(tokenizer), set(tokenizer.all_special_ids))
        if args.text_prompts:
            items = [{"prompt": tokenizer.decode(i.prompt_token_ids), "max_tokens": i.output_len} for i in items]
    results = []
    for rate in args.request_rate:
        config = ServeBenchConfig(
            base_url=args.url,
            model=args.served_model,
            request_rate=rate,
            arrival_seed=args.workload_seed,
            api_key=args.api_key or os.environ.get("HAWKER_API_KEY") or None,
            banned_token_ids=tuple(args.ban_token_id),
        )
        result = asyncio.run(run_serve_bench(config, items))
        print(result.report(), flush=True)
        results.append(result.to_dict())
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"url": args.url, "results": results}, indent=2, default=str))
    return 0 if all(r["failed"] == 0 for r in results) and not math.isnan(results[0]["ttft_s"]["mean"]) else 1


def add_bench_serve_parser(bench_sub: argparse._SubParsersAction) -> None:
    serve = bench_sub.add_parser(
        "serve",
        help="latency/throughput of an OpenAI-compatible server under Poisson arrivals",
        description="Send the standard workload (or a JSON file of prompts) to an OpenAI-compatible server as "
        "streamed /v1/completions requests; report TTFT, TPOT, ITL and end-to-end latency percentiles and throughput.",
    )
    serve.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default: %(default)s)")
    serve.add_argument("--served-model", default=None, help="model name to send (default: the server's first)")
    serve.add_argument(
        "--request-rate",
        type=float,
        nargs="+",
        default=[math.inf],
        help="requests per second, Poisson arrivals; several values run one after another; inf = all at once",
    )
    serve.add_argument("--num-prompts", type=int, default=128, help="prompts of the standard workload")
    serve.add_argument("--workload-seed", type=int, default=0, help="seed of prompts and arrivals")
    serve.add_argument(
        "--dataset", default=None, help='JSON list of {"prompt": text or token ids, "max_tokens": n} instead'
    )
    serve.add_argument(
        "--tokenizer", default=None, help="checkpoint whose vocabulary random prompts use (default: default model)"
    )
    serve.add_argument(
        "--text-prompts",
        action="store_true",
        help="send the standard workload's prompts as text (decoded token ids), for servers that take no token ids",
    )
    serve.add_argument(
        "--ban-token-id",
        type=int,
        action="append",
        default=[],
        help="send logit_bias -100 for this token (e.g. EOS, for servers without ignore_eos); repeatable",
    )
    serve.add_argument("--api-key", default=None, help="sent as a bearer token (also HAWKER_API_KEY)")
    serve.add_argument("--json-out", default=None, help="write the results as JSON here")
    serve.set_defaults(func=_cmd_bench_serve)
