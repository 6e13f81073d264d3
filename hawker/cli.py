"""Command line: `hawker serve | generate | chat | bench throughput | bench serve`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from hawker.bench.serve_cli import add_bench_serve_parser
from hawker.options import EngineOptions, option_types
from hawker.server.protocol import DEFAULT_MAX_TOKENS


def _add_engine_args(parser: argparse.ArgumentParser, model_positional: bool = False) -> None:
    """One flag per field of ``EngineOptions`` (hawker/options.py), with its help text and choices."""
    types = option_types()
    for spec in dataclasses.fields(EngineOptions):
        help_text, choices, aliases = (spec.metadata[key] for key in ("help", "choices", "aliases"))
        if spec.default is not None and "default" not in help_text:
            help_text += " (default: %(default)s)"
        flag = "--" + spec.name.replace("_", "-")
        if spec.name == "model" and model_positional:
            parser.add_argument("model", nargs="?", default=None, help=help_text)
        elif types[spec.name] is bool:
            negations = [alias for alias in aliases if alias.startswith("--no-")]
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=spec.default, help=help_text)
            for negation in negations:
                parser.add_argument(negation, dest=spec.name, action="store_false", help=f"same as --no-{flag[2:]}")
        else:
            spellings = [flag, *aliases]
            kind = types[spec.name]
            parser.add_argument(*spellings, type=kind, default=spec.default, choices=choices or None, help=help_text)


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``EngineOptions`` fields set by ``_add_engine_args``' flags (``model`` aside)."""
    return {spec.name: getattr(args, spec.name) for spec in dataclasses.fields(EngineOptions) if spec.name != "model"}


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
        chat_template=args.chat_template,
        tool_call_parser=None if args.tool_call_parser == "none" else args.tool_call_parser,
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
    serve.add_argument(
        "--chat-template",
        default=None,
        help="the chat template (a file, or the Jinja text) of every chat request, instead of the model's own; "
        "for a model whose own template cannot show tools, requests with tools otherwise use Hawker's "
        "ChatML tool template if the model speaks ChatML (the default model does)",
    )
    serve.add_argument(
        "--tool-call-parser",
        default="hermes",
        choices=["hermes", "none"],
        help="how tool_choice 'auto' answers are read for calls: 'hermes' reads the Hermes/Qwen "
        "<tool_call>{...}</tool_call> blocks into tool_calls; 'none' leaves them in the content "
        "(default: %(default)s)",
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
    from hawker.distributed import launch
    from hawker.engine import worker
    from hawker.engine.configure import world_shape

    found = launch.torchrun_rank(world_shape(options))
    if found is None or found[1] == 0:
        return False
    spec, rank = found
    worker.run_worker(options, spec, rank, launch.ranks_on_this_node(spec.world_size))
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
