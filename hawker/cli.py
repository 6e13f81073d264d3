"""Command line: `hawker serve | generate | chat | bench throughput | bench serve`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from hawker.bench.serve_cli import add_bench_serve_parser
from hawker.config import KV_CACHE_DTYPES, PLAN_CACHE_MODES
from hawker.engine.compiled_decode import WARM_UP_MODES
from hawker.engine.engine import EngineOptions
from hawker.server.protocol import DEFAULT_MAX_TOKENS


def _add_engine_args(parser: argparse.ArgumentParser, model_positional: bool = False) -> None:
    defaults = EngineOptions()
    model_help = "HF directory (config.json + safetensors) or .gguf file; default: SmolLM2-135M-Instruct"
    if model_positional:
        parser.add_argument("model", nargs="?", default=None, help=model_help)
    else:
        parser.add_argument("--model", default=None, help=model_help)
    parser.add_argument(
        "--dtype",
        default=defaults.dtype,
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and activations dtype; auto = bfloat16 (default: %(default)s)",
    )
    parser.add_argument(
        "--max-model-len", type=int, default=None, help="longest prompt + output in tokens (default: the model's)"
    )
    parser.add_argument(
        "--block-size", type=int, default=defaults.block_size, help="tokens per KV block (default: %(default)s)"
    )
    parser.add_argument(
        "--kv-cache-memory-gb",
        type=float,
        default=defaults.kv_cache_memory_gb,
        help="memory budget of the KV cache pool in GiB (default: 2 on CPU; on a GPU what "
        "--gpu-memory-utilization leaves after the weights and a worst-case step)",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        default=defaults.kv_cache_dtype,
        choices=list(KV_CACHE_DTYPES),
        help="what the KV cache holds: auto = the model's dtype; fp8 (= fp8_e4m3) or fp8_e5m2 halve its bytes, "
        "rounding keys and values to 8 bits (torch attention backend; default: %(default)s)",
    )
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=defaults.gpu_memory_utilization,
        help="fraction of GPU memory for weights, activations and KV cache together (default: %(default)s)",
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=defaults.max_num_batched_tokens,
        help="token budget of one engine step, prefill chunks + decodes (default: %(default)s)",
    )
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=defaults.max_num_seqs,
        help="most sequences running concurrently (default: %(default)s)",
    )
    parser.add_argument("--no-prefix-caching", action="store_true", help="turn automatic prefix caching off")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of unseeded sampling (default: 0)")
    parser.add_argument(
        "--int4-decode-max-rows",
        type=int,
        default=defaults.int4_decode_max_rows,
        help="steps with at most this many tokens use int4 copies of the layers that are 4-bit in the "
        "checkpoint (GGUF Q4_1/Q4_0); 0 = off (default: on CPU, wherever the matmul plan measured at "
        "start-up finds them faster)",
    )
    parser.add_argument(
        "--fp32-matmul-min-rows",
        type=int,
        default=defaults.fp32_matmul_min_rows,
        help="steps with at least this many tokens multiply bfloat16/float16 weights through float32 copies "
        "(more memory); 0 = off (default: on CPU, wherever the measured plan finds them faster: CPUs "
        "with neither AVX512-BF16 nor AMX)",
    )
    parser.add_argument(
        "--packed-matmul",
        action=argparse.BooleanOptionalAction,
        default=defaults.packed_matmul,
        help="multiply through oneDNN-prepacked weights (no weight reorder per call; several times faster "
        "for few rows) (default: on CPU, wherever the measured plan finds them faster)",
    )
    parser.add_argument(
        "--panel-matmul",
        action=argparse.BooleanOptionalAction,
        default=defaults.panel_matmul,
        help="multiply bfloat16 weights by Hawker's C kernel over weights packed in panels (float32 sums, "
        "half the bytes of a float32 copy) (default: on CPUs with AVX512-BF16, wherever the measured "
        "plan finds it faster)",
    )
    parser.add_argument(
        "--int8-dot-matmul",
        action=argparse.BooleanOptionalAction,
        default=defaults.int8_dot_matmul,
        help="multiply weights that are 4/8-bit in the checkpoint (GGUF Q4_1, Q8_0) by 8-bit integer dot "
        "products, activations quantised to 8 bits per group of 32 as llama.cpp does (default: for "
        "half-precision models on CPUs with AVX512-VNNI, wherever the measured plan finds it faster)",
    )
    parser.add_argument(
        "--matmul-plan-cache",
        choices=PLAN_CACHE_MODES,
        default=defaults.matmul_plan_cache,
        help="reuse: the matmul plan measured before on this machine and software, if any (kept beside the "
        "native kernels; `hawker prepare` measures it at install time); refresh: measure and keep; off: "
        "measure at every start, keep nothing (default: %(default)s)",
    )
    parser.add_argument(
        "--device",
        default=defaults.device,
        help="torch device to run on, e.g. cpu, cuda, cuda:1 (default: auto = cuda when a GPU is visible, else cpu)",
    )
    parser.add_argument(
        "--attention-backend",
        choices=("auto", "torch", "triton"),
        default=defaults.attention_backend,
        help="paged attention implementation (default: auto = triton on CUDA when installed, else torch)",
    )
    parser.add_argument(
        "--compile-decode-max-rows",
        type=int,
        default=defaults.compile_decode_max_rows,
        help="decode-only steps of at most this many sequences run a torch.compile'd forward, compiled at "
        "start-up (needs a C++ compiler); 0 = off (default: 16 on CPU, else off)",
    )
    parser.add_argument(
        "--compile-warmup",
        choices=WARM_UP_MODES,
        default=defaults.compile_warmup,
        help="how that forward is compiled (~100 s the first time on a small CPU, ~15 s with inductor's cache "
        "warm): background = serve at once with eager steps and switch when it is built (/health says "
        "warming_up until then); blocking = before the first step, as benchmarks want (default: background "
        "for serve, else blocking)",
    )
    parser.add_argument(
        "--compile-cpp-wrapper",
        action=argparse.BooleanOptionalAction,
        default=defaults.compile_cpp_wrapper,
        help="that forward's calls of its kernels are C++ (inductor's cpp_wrapper), not Python: one stream "
        "~20%% faster on a small CPU, a longer compile (default: on)",
    )
    parser.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=defaults.tensor_parallel_size,
        help="shard each layer over this many processes (default: %(default)s)",
    )
    parser.add_argument(
        "--pipeline-parallel-size",
        "-pp",
        type=int,
        default=defaults.pipeline_parallel_size,
        help="split the layers into this many pipeline stages, one process group each (default: %(default)s); "
        "the tensor x pipeline processes start on this node, or under torchrun across nodes",
    )
    parser.add_argument(
        "--tp-overlap-chunks",
        type=int,
        default=defaults.tp_overlap_chunks,
        help="row-parallel layers all-reduce in this many chunks, each while the next is multiplied; "
        "1 = off (default: %(default)s)",
    )
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="batch-invariant numerics: a request's tokens and logprobs are bitwise the same whatever else "
        "runs with it (much slower for large batches; turns the CPU fast paths off)",
    )
    parser.add_argument(
        "--consistent-numerics",
        action=argparse.BooleanOptionalAction,
        default=defaults.consistent_numerics,
        help="a token's numbers do not depend on the step's size: the same greedy text cold, after a "
        "prefix-cache hit, for every one of n choices and beside up to 16 decoding requests (row-invariant "
        "or tiled matmuls; default: on for the torch attention backend, i.e. on a CPU)",
    )
    parser.add_argument(
        "--native-decode-attention",
        action=argparse.BooleanOptionalAction,
        default=defaults.native_decode_attention,
        help="decodes read the paged KV cache in place through a small C kernel built on first use "
        "(default: on for the torch attention backend on a CPU wherever a C compiler builds it)",
    )
    parser.add_argument(
        "--native-prefill-attention",
        action=argparse.BooleanOptionalAction,
        default=defaults.native_prefill_attention,
        help="prompt chunks attend over the paged KV cache in place through a small C kernel built on first "
        "use, row-invariant (default: on for the torch attention backend on a CPU wherever it builds)",
    )
    parser.add_argument(
        "--cuda-graph-max-batch-size",
        type=int,
        default=defaults.cuda_graph_max_batch_size,
        help="decode-only steps of at most this many sequences replay CUDA graphs captured at start-up; "
        "0 = off (default: min(max-num-seqs, 256) on CUDA with the triton backend, else off)",
    )
    parser.add_argument(
        "--overlap-scheduling",
        action=argparse.BooleanOptionalAction,
        default=defaults.overlap_scheduling,
        help="schedule and launch step N+1 while step N runs on the device, reading N's tokens back "
        "afterwards (default: on for one process on a GPU, else off)",
    )


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "dtype": args.dtype,
        "max_model_len": args.max_model_len,
        "block_size": args.block_size,
        "kv_cache_memory_gb": args.kv_cache_memory_gb,
        "kv_cache_dtype": args.kv_cache_dtype,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_num_seqs": args.max_num_seqs,
        "enable_prefix_caching": not args.no_prefix_caching,
        "seed": args.seed,
        "int4_decode_max_rows": args.int4_decode_max_rows,
        "fp32_matmul_min_rows": args.fp32_matmul_min_rows,
        "packed_matmul": args.packed_matmul,
        "panel_matmul": args.panel_matmul,
        "int8_dot_matmul": args.int8_dot_matmul,
        "matmul_plan_cache": args.matmul_plan_cache,
        "compile_decode_max_rows": args.compile_decode_max_rows,
        "compile_warmup": args.compile_warmup,
        "compile_cpp_wrapper": args.compile_cpp_wrapper,
        "attention_backend": args.attention_backend,
        "cuda_graph_max_batch_size": args.cuda_graph_max_batch_size,
        "tensor_parallel_size": args.tensor_parallel_size,
        "pipeline_parallel_size": args.pipeline_parallel_size,
        "tp_overlap_chunks": args.tp_overlap_chunks,
        "deterministic": args.deterministic,
        "consistent_numerics": args.consistent_numerics,
        "native_decode_attention": args.native_decode_attention,
        "native_prefill_attention": args.native_prefill_attention,
        "overlap_scheduling": args.overlap_scheduling,
        "device": args.device,
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


def _cmd_serve(args: argparse.Namespace) -> int:
    from hawker.engine.engine import EngineOptions
    from hawker.server.serve import ServeOptions, exit_process, run
    from hawker.server.tracing import tracing_enabled_by_env

    logging.getLogger().setLevel(args.log_level.upper())
    options = ServeOptions(
        engine=EngineOptions(model=args.model, **_engine_kwargs(args)),
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("HAWKER_API_KEY") or None,
        served_model_name=args.served_model_name,
        max_waiting_requests=args.max_waiting_requests,
        max_request_body_mb=args.max_request_body_mb,
        max_tokens_default=args.max_tokens_default,
        shutdown_grace_s=args.shutdown_grace_s,
        allowed_weight_roots=tuple(args.allowed_weight_roots),
        log_level=args.log_level,
        data_parallel_size=args.data_parallel_size,
        otel_tracing=args.otel_tracing or tracing_enabled_by_env(),
        request_log_level=args.request_log_level,
        inject_fault_token_id=args.inject_fault_token_id,
        inject_fatal_token_id=args.inject_fatal_token_id,
    )
    # Straight out once the server has stopped: the interpreter's teardown would outlast the grace period.
    exit_process(run(options))


def _cmd_prepare(args: argparse.Namespace) -> int:
    """Build what a first start would: the native kernels and the measured matmul plans (both cached)."""
    import time

    from hawker.engine.engine import Engine
    from hawker.kernels import native

    logging.getLogger().setLevel(logging.INFO)
    kwargs = _engine_kwargs(args)
    kwargs["matmul_plan_cache"] = "refresh"  # prepare's point: a measurement on a quiet machine
    if args.compile:  # also fill torch's inductor cache with the compiled decode step
        kwargs["compile_warmup"] = "blocking"
    else:
        kwargs["compile_decode_max_rows"] = 0
    start = time.monotonic()
    engine = Engine.from_options(EngineOptions(model=args.model, **kwargs))
    engine.shutdown()
    print(f"prepared in {time.monotonic() - start:.1f} s; kernels and matmul plans are kept in {native.cache_dir()}")
    return 0


def _add_prepare_parser(sub: argparse._SubParsersAction) -> None:
    prepare = sub.add_parser(
        "prepare",
        help="build the native kernels and measure the matmul plans once, so that later starts skip both",
        description="Build the CPU kernels and measure the matmul plans for a model with `hawker serve`'s "
        "options, keeping both in the kernel cache (HAWKER_KERNEL_CACHE, default ~/.cache/hawker/kernels): "
        "later starts on this machine skip both. scripts/setup.sh runs it for the default model.",
    )
    _add_engine_args(prepare, model_positional=True)
    prepare.add_argument(
        "--compile", action="store_true", help="also compile the decode step once (fills torch's inductor cache)"
    )
    prepare.set_defaults(func=_cmd_prepare)


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve",
        help="serve a model behind an OpenAI-compatible HTTP API",
        description="Serve a model behind an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
        "/v1/models, /health, /metrics, /tokenize, /detokenize), with a live dashboard at /dashboard "
        "(its numbers: /v1/stats).",
    )
    _add_engine_args(serve, model_positional=True)
    serve.set_defaults(compile_warmup="background")  # answer within seconds of starting
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    serve.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' (also read from HAWKER_API_KEY); /health and /metrics stay open",
    )
    serve.add_argument(
        "--served-model-name", default=None, help="model name clients use (default: the checkpoint's name)"
    )
    serve.add_argument(
        "--max-waiting-requests",
        type=int,
        default=1024,
        help="sequences (a request's n samples each) that may wait to be scheduled; beyond this a request gets "
        "429 with Retry-After, and one that alone needs more gets 400 (default: %(default)s)",
    )
    serve.add_argument(
        "--max-tokens-default",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help="max_tokens of a request that sets none (a chat request without max_tokens or "
        "max_completion_tokens, a completion with max_tokens null), lowered to what the prompt leaves of "
        "the context; bounds how long one request can hold the server (default: %(default)s)",
    )
    serve.add_argument(
        "--max-request-body-mb",
        type=float,
        default=16.0,
        help="larger request bodies get 413 (default: %(default)s)",
    )
    serve.add_argument(
        "--shutdown-grace-s",
        type=float,
        default=30.0,
        help="on SIGTERM, the longest the server takes to exit: in-flight requests may finish until shortly "
        "before it ends (up to 0.5 s is kept for shutting down), then they are aborted (default: %(default)s)",
    )
    serve.add_argument(
        "--allowed-weight-roots",
        nargs="+",
        default=[],
        metavar="DIR",
        help="/admin/update_weights loads only directories under one of these (symlinks resolved); "
        "default: any directory the server can read. Files are always confined to the directory given",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (default: %(default)s)",
    )
    serve.add_argument(
        "--data-parallel-size",
        type=int,
        default=1,
        help="engine replicas behind this server, each with the whole model and its own KV cache; a request "
        "goes to the replica holding the longest cached prefix of its prompt, else the least loaded; on a "
        "CPU the replicas split the torch threads, on a node with enough GPUs replica i uses cuda:i "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--request-log-level",
        default="info",
        choices=["debug", "info", "warning", "off"],
        help="log one line per finished request (id, tokens, TTFT, total time, finish reason) on the "
        "'hawker.requests' logger at this level; --log-level still filters it (default: %(default)s)",
    )
    serve.add_argument(
        "--otel-tracing",
        action="store_true",
        help="export one OpenTelemetry span per request with queue, prefill and decode child spans (also "
        "HAWKER_OTEL_TRACING=1); the standard OTEL_* variables choose the exporter and endpoint "
        "(OTEL_TRACES_EXPORTER=otlp|console|none, OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, ...); "
        "needs pip install 'hawker[otel]'",
    )
    # Test hooks, not for users: a prompt containing the token fails / kills the engine loop.
    serve.add_argument("--inject-fault-token-id", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--inject-fatal-token-id", type=int, default=None, help=argparse.SUPPRESS)
    serve.set_defaults(func=_cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hawker", description="Hawker LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve_parser(sub)
    _add_prepare_parser(sub)

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
    add_bench_serve_parser(bench_sub)
    return parser


def _is_torchrun_worker(args: argparse.Namespace) -> bool:
    """Under torchrun every rank runs the same command: ranks other than 0 serve steps, then exit here."""
    if not hasattr(args, "tensor_parallel_size"):
        return False
    options = EngineOptions(model=getattr(args, "model", None), **_engine_kwargs(args))
    if options.world_size == 1:
        return False
    from hawker.distributed import launch, worker
    from hawker.engine.engine import world_shape

    found = launch.torchrun_rank(world_shape(options))
    if found is None or found[1] == 0:
        return False
    worker.run_worker(options, *found)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if _is_torchrun_worker(args):
            return 0
        return int(args.func(args))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
