"""`hawker serve`: build the engine and app, run uvicorn, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import NoReturn

import torch
import uvicorn

from hawker.engine.async_engine import AsyncEngine, build_off_main_thread
from hawker.engine.configure import resolve_device
from hawker.engine.engine import Engine
from hawker.engine.faults import TokenFault
from hawker.loader.chat_templates import read_chat_template
from hawker.options import EngineOptions
from hawker.server.app import ServerSettings, ServerState, build_app
from hawker.server.protocol import DEFAULT_MAX_TOKENS
from hawker.server.router import ReplicaRouter
from hawker.server.tracking import REQUEST_LOG_LEVELS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    engine: EngineOptions
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_waiting_requests: int = 1024
    max_request_body_mb: float = 16.0
    max_tokens_default: int = DEFAULT_MAX_TOKENS
    # SIGTERM to exit, in-flight requests included: they are aborted shortly before it runs out.
    shutdown_grace_s: float = 30.0
    # /admin/update_weights only loads directories under these (none given: any directory).
    allowed_weight_roots: tuple[str, ...] = ()
    log_level: str = "info"
    # Engine replicas behind the server, each with the whole model and its own
    # KV cache; requests go where their prompt's prefix is cached.
    data_parallel_size: int = 1
    # One span per request (queue, prefill, decode) through OpenTelemetry, set up by the OTEL_* variables.
    otel_tracing: bool = False
    # The level of the one-line log of each finished request; "off" = none.
    request_log_level: str = "info"
    # --chat-template (a file or the Jinja text) and --tool-call-parser (hermes, or None).
    chat_template: str | None = None
    tool_call_parser: str | None = "hermes"
    # Test hooks: a prompt holding this token fails (or kills the engine loop).
    inject_fault_token_id: int | None = None
    inject_fatal_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {self.data_parallel_size}")
        if self.data_parallel_size > 1 and self.engine.world_size > 1:
            # torch.distributed has one default process group per process: replicas cannot each own one.
            raise ValueError(
                "data_parallel_size > 1 cannot be combined with tensor or pipeline parallelism yet; "
                "run one server per tensor x pipeline group instead"
            )
        if not self.shutdown_grace_s >= 0:
            raise ValueError(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")
        for root in self.allowed_weight_roots:
            if not Path(root).expanduser().is_dir():
                raise ValueError(f"allowed weight root {root!r} is not a directory")
        if self.request_log_level not in REQUEST_LOG_LEVELS:
            choices = ", ".join(REQUEST_LOG_LEVELS)
            raise ValueError(f"request_log_level must be one of {choices}, got {self.request_log_level!r}")


# How long /health says 503 before a server whose distributed engine died exits.
DEAD_RANK_EXIT_DELAY_S = 2.0
# Of the grace period, what is kept for the steps after the abort (at most half of it): the aborted
# streams' last chunks, uvicorn's shutdown (0.1-0.2 s of fixed waits), the engine threads' stop.
EXIT_RESERVE_S = 0.5


def exit_process(code: int) -> NoReturn:
    """Exit now, once logs and stdio are flushed, skipping the interpreter's teardown.

    Tearing down torch and transformers takes 0.5-1 s on a small CPU, which a
    supervisor's grace period would otherwise have to cover. Called only once
    the server has stopped (or its grace period is over).
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or broken: nothing more can be said
            stream.flush()
    os._exit(code)


class DrainingServer(uvicorn.Server):
    """uvicorn, except that SIGTERM/SIGINT drain first.

    The first signal stops accepting (listening sockets close, new requests
    on open connections get 503), waits for in-flight requests until shortly
    before the grace period ends, aborts the rest (their clients get
    finish_reason "abort"), then exits normally (status 0). The grace period
    bounds the whole exit: should shutting down still be under way when it
    ends, the process exits then. A second signal exits at once.
    """

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain_task: asyncio.Task | None = None
        self.failure: str | None = None  # why the server gave up (then the process exits non-zero)

    def fail(self, reason: str, after_s: float) -> None:
        """Exit (non-zero) ``after_s`` seconds from now; callable from any thread.

        The delay lets health checks see the 503 before the port closes.
        """
        if self.failure is not None or self._loop is None:
            return
        self.failure = reason
        logger.error("%s: exiting in %.1f s", reason, after_s)

        def stop() -> None:
            self.should_exit = True

        self._loop.call_soon_threadsafe(lambda: self._loop.call_later(after_s, stop))  # type: ignore[union-attr]

    async def serve(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not calling super(): uvicorn would re-raise the signal after exiting,
        # and the process would die by SIGTERM instead of exiting 0.
        del frame
        if self._draining or self._loop is None:
            self.should_exit = True
            self.force_exit = self._draining
            return
        self._draining = True
        grace = self.state.settings.shutdown_grace_s
        deadline = time.monotonic() + grace
        logger.info("received %s: draining (grace period %.1f s)", signal.Signals(sig).name, grace)
        # The bound, whatever blocks the orderly path (a long step, a stuck connection, a thread join).
        watchdog = threading.Timer(grace, self._grace_over)
        watchdog.daemon = True
        watchdog.start()
        self._loop.call_soon_threadsafe(self._start_drain, deadline)

    def _start_drain(self, deadline: float) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain(deadline))

    def _grace_over(self) -> None:
        logger.error("still shutting down when the grace period ended: exiting now")
        exit_process(1 if self.failure is not None else 0)

    async def _drain(self, deadline: float) -> None:
        state = self.state
        state.draining = True
        for server in self.servers:
            server.close()
        grace = state.settings.shutdown_grace_s
        abort_at = deadline - min(EXIT_RESERVE_S, grace / 2)
        if not await state.router.wait_idle(max(0.0, abort_at - time.monotonic())):
            aborted = state.router.abort_all()
            logger.warning("grace period of %.1f s ending: aborting %d request(s)", grace, len(aborted))
            await state.router.wait_idle(max(0.0, deadline - time.monotonic()) / 2)
        await asyncio.sleep(0.05)  # let the last chunks reach the sockets
        self.should_exit = True


def served_name(model_path: str, requested: str | None) -> str:
    if requested:
        return requested
    path = Path(model_path)
    return path.stem if path.suffix == ".gguf" else path.name


def replica_engine_options(options: EngineOptions, index: int, size: int) -> EngineOptions:
    """The engine options of data-parallel replica ``index`` of ``size``.

    Replicas differ in their seed (so that unseeded sampling does not draw
    the same numbers on every replica) and, on a node with enough GPUs, in
    their device: replica i runs on cuda:i when the device was left as
    "auto" or "cuda". One replica keeps the options exactly as given.
    """
    if size == 1:
        return options
    device = resolve_device(options.device)
    if torch.device(device).type == "cuda":
        device = _replica_cuda_device(device, index, size, options.kv_cache_memory_gb)
    return dataclasses.replace(options, device=device, seed=options.seed + index)


def _replica_cuda_device(device: str, index: int, size: int, kv_cache_memory_gb: float | None) -> str:
    if torch.device(device).index is None and torch.cuda.device_count() >= size:
        return f"cuda:{index}"
    if kv_cache_memory_gb is None:
        # Each replica would size its KV pool from the memory the ones before it left.
        raise ValueError(
            f"{size} data-parallel replicas would share {device}: set --kv-cache-memory-gb so that "
            "their KV caches fit side by side, or run one replica per GPU"
        )
    return device


def cpu_threads_per_replica(total_threads: int, size: int) -> int:
    """Split the CPU's torch threads between replicas, so that their steps do not fight for cores."""
    return max(1, total_threads // size)


def build_router(options: ServeOptions) -> ReplicaRouter:
    """Load ``data_parallel_size`` engines (one after another) behind a router."""
    size = options.data_parallel_size
    if size > 1 and torch.device(resolve_device(options.engine.device)).type == "cpu":
        # torch's intra-op thread count is process-wide: every replica's step
        # thread runs its ops on this many threads.
        threads = cpu_threads_per_replica(torch.get_num_threads(), size)
        logger.info("%d data-parallel replicas on CPU: %d torch thread(s) each", size, threads)
        torch.set_num_threads(threads)
    replicas = []
    for index in range(size):
        engine = Engine.from_options(replica_engine_options(options.engine, index, size))
        _install_test_hooks(engine, options)
        replicas.append(AsyncEngine(engine, max_waiting_requests=options.max_waiting_requests))
    return ReplicaRouter(replicas)


def _install_test_hooks(engine: Engine, options: ServeOptions) -> None:
    for token_id, fatal in ((options.inject_fault_token_id, False), (options.inject_fatal_token_id, True)):
        if token_id is not None:
            logger.warning("test hook: requests with token %d %s", token_id, "kill the engine" if fatal else "fail")
            engine.pre_execute_hooks.append(TokenFault(token_id, fatal=fatal))


def run(options: ServeOptions) -> int:
    # Before the model loads, so that a missing OpenTelemetry package fails at once.
    provider = None
    tracer = None
    if options.otel_tracing:
        from hawker.server.tracing import INSTRUMENTATION_NAME, RequestTracer, provider_from_env

        try:
            provider = provider_from_env()
        except RuntimeError as error:
            raise ValueError(str(error)) from None  # the CLI prints it as a usage error
        tracer = RequestTracer(provider.get_tracer(INSTRUMENTATION_NAME))
        logger.info("OpenTelemetry tracing on: one span per request")
    ray = None
    if options.engine.distributed_executor_backend == "ray" and options.engine.world_size > 1:
        from hawker.distributed.ray_executor import connect_ray

        # A local Ray's processes die with the thread that started them (PR_SET_PDEATHSIG): start or
        # join it from this long-lived thread, not from the short-lived build thread below.
        ray = connect_ray(options.engine.ray_address)
    # The main thread serves HTTP and must never own a CPU thread pool (build_off_main_thread).
    router = build_off_main_thread(lambda: build_router(options))
    settings = ServerSettings(
        served_model_name=served_name(router.replicas[0].engine.config.model_path, options.served_model_name),
        api_key=options.api_key,
        max_request_body_bytes=int(options.max_request_body_mb * 1024 * 1024),
        shutdown_grace_s=options.shutdown_grace_s,
        allowed_weight_roots=tuple(Path(root).expanduser().resolve() for root in options.allowed_weight_roots),
        max_tokens_default=options.max_tokens_default,
        request_log_level=options.request_log_level,
        chat_template=None if options.chat_template is None else read_chat_template(options.chat_template),
        tool_call_parser=options.tool_call_parser,
        reasoning_parser=options.engine.reasoning_parser,
    )
    app = build_app(router, settings, tracer)
    # What is alive now (the model, torch, transformers: ~500k objects) lives as long as the
    # server. Frozen, it is no longer traversed by every full collection, which otherwise
    # makes parsing one large JSON body (say a million small lists) seconds slower.
    gc.collect()
    gc.freeze()
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level=options.log_level)
    server = DrainingServer(config, app.state.hawker)
    if options.engine.world_size > 1:
        # A distributed engine whose loop died has lost a rank: it cannot
        # recover in this process, so leave for a supervisor to restart it.
        for replica in router.replicas:
            replica.on_dead = lambda reason: server.fail(f"the engine died ({reason})", DEAD_RANK_EXIT_DELAY_S)
    logger.info("serving %s on http://%s:%d", settings.served_model_name, options.host, options.port)
    try:
        server.run()
    finally:
        for replica in router.replicas:
            replica.engine.shutdown()
        if ray is not None:
            ray.shutdown()  # stops a local cluster this process started; else only disconnects
        if provider is not None:
            provider.shutdown()  # exports the spans still batched
    return 1 if server.failure is not None else 0
