"""`hawker serve`: build the engine and app, run uvicorn, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import uvicorn

from hawker.engine.async_engine import AsyncEngine
from hawker.engine.engine import Engine, EngineOptions
from hawker.engine.faults import TokenFault
from hawker.server.app import ServerSettings, ServerState, build_app

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
    shutdown_grace_s: float = 30.0
    log_level: str = "info"
    # Test hooks: a prompt holding this token fails (or kills the engine loop).
    inject_fault_token_id: int | None = None
    inject_fatal_token_id: int | None = None


class DrainingServer(uvicorn.Server):
    """uvicorn, except that SIGTERM/SIGINT drain first.

    The first signal stops accepting (listening sockets close, new requests
    on open connections get 503), waits up to the grace period for in-flight
    requests, aborts the rest (their clients get finish_reason "abort"), then
    exits normally (status 0). A second signal exits at once.
    """

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

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
        logger.info("received %s: draining", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))  # type: ignore[union-attr]

    async def _drain(self) -> None:
        state = self.state
        state.draining = True
        for server in self.servers:
            server.close()
        grace = state.settings.shutdown_grace_s
        if not await state.engine.wait_idle(grace):
            aborted = state.engine.abort_all()
            logger.warning("grace period of %.1f s over: aborting %d request(s)", grace, len(aborted))
            await state.engine.wait_idle(5.0)
        await asyncio.sleep(0.1)  # let the last chunks reach the sockets
        self.should_exit = True


def served_name(model_path: str, requested: str | None) -> str:
    if requested:
        return requested
    path = Path(model_path)
    return path.stem if path.suffix == ".gguf" else path.name


def run(options: ServeOptions) -> int:
    engine = Engine.from_options(options.engine)
    for token_id, fatal in ((options.inject_fault_token_id, False), (options.inject_fatal_token_id, True)):
        if token_id is not None:
            logger.warning("test hook: requests with token %d %s", token_id, "kill the engine" if fatal else "fail")
            engine.pre_execute_hooks.append(TokenFault(token_id, fatal=fatal))
    async_engine = AsyncEngine(engine, max_waiting_requests=options.max_waiting_requests)
    settings = ServerSettings(
        served_model_name=served_name(engine.config.model_path, options.served_model_name),
        api_key=options.api_key,
        max_request_body_bytes=int(options.max_request_body_mb * 1024 * 1024),
        shutdown_grace_s=options.shutdown_grace_s,
    )
    app = build_app(async_engine, settings)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level=options.log_level)
    server = DrainingServer(config, app.state.hawker)
    logger.info("serving %s on http://%s:%d", settings.served_model_name, options.host, options.port)
    server.run()
    return 0
