"""AsyncEngine: the engine loop on a background thread, one async stream per request.

The event loop (HTTP) never runs a step: it validates a request, hands it to
the loop thread through a command queue and awaits the request's own
``asyncio.Queue``. The loop thread applies queued commands (add, abort)
between steps, runs ``Engine.step()`` and posts each step's outputs back to
the event loop in one ``call_soon_threadsafe``. Only the event loop touches
the streams; only the loop thread touches the engine (``Engine.validate``
reads configuration alone and is safe from either side).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from transformers import PreTrainedTokenizerBase

from hawker.engine.engine import Engine, EngineStats
from hawker.outputs import RequestOutput
from hawker.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long the idle loop thread sleeps before it looks at the stop flag again.
_IDLE_POLL_S = 0.05


def build_off_main_thread(build: Callable[[], T]) -> T:
    """``build()`` run on a short-lived thread; returns its result or raises its error.

    Why: torch's CPU kernels run on libgomp, which keeps one pool of worker
    threads for every thread that has ever started a parallel region, for
    as long as that thread lives. Once it manages more threads than there are
    CPUs, libgomp stops spinning between regions and puts its workers to
    sleep, so every region pays a wake-up. Loading and warming the model on
    the main thread (which lives as long as the server) left a second pool
    beside the engine loop thread's: on a 2-vCPU machine a small elementwise
    op went from 22 to 100 us and the server's steps took 1.7-4x as long as
    the same steps run offline (benchmarks/NOTES.md). Built on a thread that
    then exits, the engine leaves no pool behind; the loop thread's is then
    the only one.
    """
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(build())
        except BaseException as error:  # re-raised on the caller's thread
            errors.append(error)

    thread = threading.Thread(target=run, name="hawker-build")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; no request can be served."""


class EngineBusyError(RuntimeError):
    """Too many requests are waiting; the client should retry later."""


class RequestFailedError(RuntimeError):
    """The engine failed on this request (other requests are unaffected)."""

    def __init__(self, request_id: str, reason: str) -> None:
        super().__init__(f"request {request_id} failed in the engine: {reason}")
        self.request_id = request_id
        self.reason = reason


class RequestObserver:
    """Receives every output as it reaches the event loop (metrics hook); all no-ops here."""

    def on_output(self, output: RequestOutput, now: float, previous: StreamProgress | None) -> None:
        del output, now, previous

    def on_step(self, seconds: float) -> None:
        del seconds

    def on_client_gone(self, request_id: str) -> None:
        del request_id

    def on_stream_closed(self, request_id: str) -> None:
        """Every stream ends here exactly once, finished or not (a router's in-flight count)."""
        del request_id


@dataclass(frozen=True)
class StreamProgress:
    """What a request's stream has delivered so far."""

    num_tokens: int
    time: float


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    arrival_time: float


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _Call:
    """Run ``fn`` on the engine thread (between steps); its result or error settles ``future``."""

    fn: Callable[[Engine], Any]
    future: asyncio.Future[Any]


@dataclass(frozen=True)
class Submission:
    """One request for ``AsyncEngine.submit_many``."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None


class AsyncEngine:
    def __init__(
        self,
        engine: Engine,
        max_waiting_requests: int = 1024,
    ) -> None:
        self.engine = engine
        # The loop thread decodes with engine.tokenizer; HTTP handlers encode
        # with this copy, because a fast tokenizer's encode mutates its
        # padding/truncation state and must not run concurrently with it.
        self.tokenizer: PreTrainedTokenizerBase = copy.deepcopy(engine.tokenizer)
        self.max_waiting_requests = max_waiting_requests
        self.observer = RequestObserver()  # the router replaces it (and forwards to the metrics)
        self._commands: queue.SimpleQueue[_Add | _Abort | _Call | None] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._progress: dict[str, StreamProgress] = {}
        # Sequences (a request's n samples each) handed to the loop thread and not yet in its scheduler.
        self._pending_seqs = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats_lock = threading.Lock()
        self._stats = engine.stats()
        self.dead_reason: str | None = None
        # Called from the loop thread with the reason when the engine loop dies.
        self.on_dead: Callable[[str], None] | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the loop thread; call from the event loop that will consume outputs."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="hawker-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_healthy(self) -> bool:
        return self.dead_reason is None and self._thread is not None and self._thread.is_alive()

    @property
    def is_warming_up(self) -> bool:
        """The compiled decode step is still being built (read from any thread: a flag the compile sets)."""
        return self.engine.warming_up

    def raise_if_dead(self) -> None:
        """Raise ``EngineDeadError`` saying why, unless the engine loop is running."""
        if not self.is_healthy:
            raise EngineDeadError(f"the engine is not running: {self.dead_reason or 'not started'}")

    def stats(self) -> EngineStats:
        with self._stats_lock:
            return self._stats

    # -------------------------------------------------------------- requests
    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
    ) -> RequestStream:
        """Validate and queue one request now; returns the stream of its outputs (see ``submit_many``)."""
        return self.submit_many([Submission(request_id, prompt_token_ids, params, prompt)])[0]

    def submit_many(self, submissions: Sequence[Submission]) -> list[RequestStream]:
        """Validate every request, then queue them all: a rejection queues none.

        Raises ``ValueError`` (bad request, or more sequences than the waiting
        queue holds even when empty), ``EngineBusyError`` (the waiting queue
        has no room for them now) or ``EngineDeadError`` before anything is
        queued. The queue counts sequences: a request with ``n`` samples takes
        ``n`` places. Closing a stream before its last output aborts its request.
        """
        self.raise_if_dead()
        self._check_fits_queue(submissions)
        for item in submissions:
            if item.request_id in self._streams:
                raise ValueError(f"request id {item.request_id!r} is already in use")
            self.engine.validate(item.prompt_token_ids, item.params)
        asked = sum(item.params.n for item in submissions)
        waiting = self.stats().num_waiting + self._pending_seqs
        if waiting + asked > self.max_waiting_requests:
            raise EngineBusyError(
                f"{waiting} sequences are waiting and this request adds {asked} "
                f"(limit {self.max_waiting_requests}); retry later"
            )
        streams = []
        for item in submissions:
            stream = RequestStream(item.request_id, self._release)
            self._streams[item.request_id] = stream
            self._pending_seqs += item.params.n
            command = _Add(item.request_id, list(item.prompt_token_ids), item.params, item.prompt, time.monotonic())
            self._commands.put(command)
            streams.append(stream)
        return streams

    def _check_fits_queue(self, submissions: Sequence[Submission]) -> None:
        """A request with more sequences than the whole waiting queue could never be queued: a 400, not a 429."""
        asked = sum(item.params.n for item in submissions)
        if asked <= self.max_waiting_requests:
            return
        # Named after the field the client should lower (the error's "param").
        field = "n" if len(submissions) == 1 else "prompt"
        raise ValueError(
            f"{field} too large: the request needs {asked} sequences ({len(submissions)} prompt(s) x n), but at most "
            f"{self.max_waiting_requests} may wait at once (max_waiting_requests); send fewer prompts or samples"
        )

    def _release(self, stream: RequestStream) -> None:
        """A stream closed: forget it; abort its request unless it finished."""
        self._streams.pop(stream.request_id, None)
        self._progress.pop(stream.request_id, None)
        if not stream.finished:
            self.abort(stream.request_id)
            self.observer.on_client_gone(stream.request_id)
        self.observer.on_stream_closed(stream.request_id)

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """Run ``fn(engine)`` on the engine thread between two steps and return what it returns.

        Admin operations (weight updates, pause, sleep) go through here, so
        they never run while a step does.
        """
        self.raise_if_dead()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._commands.put(_Call(fn, future))
        return await future

    def abort(self, request_id: str) -> None:
        """Abort a request (its blocks return to the pool after the current step)."""
        self._commands.put(_Abort(request_id))

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if the timeout came first."""
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self._streams

    def abort_all(self) -> list[str]:
        ids = list(self._streams)
        for request_id in ids:
            self.abort(request_id)
        return ids

    # ------------------------------------------------------- the loop thread
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                # Also while idle: a dead worker rank must show in /health within a poll interval.
                self.engine.check_health()
                idle = self.engine.paused or not self.engine.has_unfinished_requests()
                self._apply_commands(block=idle)
                if self._stop.is_set() or self.engine.paused or not self.engine.has_unfinished_requests():
                    continue
                start = time.perf_counter()
                outputs = self.engine.step()
                seconds = time.perf_counter() - start
                self._publish_stats()
                self._post(functools.partial(self._deliver, outputs, seconds))
        except BaseException as error:
            self.dead_reason = f"{type(error).__name__}: {error}"
            logger.exception("the engine loop died")
            dead = EngineDeadError(f"the engine loop died: {self.dead_reason}")
            self._post(lambda: self._fail_all(dead))
            if self.on_dead is not None:
                self.on_dead(self.dead_reason)

    def _apply_commands(self, block: bool) -> None:
        command: _Add | _Abort | _Call | None
        try:
            command = self._commands.get(timeout=_IDLE_POLL_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
        self._publish_stats()

    def _apply(self, command: _Add | _Abort | _Call | None) -> None:
        if isinstance(command, _Call):
            self._run_call(command)
        elif isinstance(command, _Abort):
            # An abort can reach a request that finished meanwhile: then it is a no-op.
            final = self.engine.abort(command.request_id)
            if final is not None:
                logger.info("aborted request %s", command.request_id)
                self._post(lambda: self._deliver([final], None))
        elif isinstance(command, _Add):
            self._post(functools.partial(self._added, command.params.n))
            try:
                self.engine.add_request(
                    command.request_id,
                    command.prompt_token_ids,
                    command.params,
                    prompt=command.prompt,
                    arrival_time=command.arrival_time,
                )
            except ValueError as error:  # checked before queueing; only a race lands here
                self._post(functools.partial(self._deliver_error, command.request_id, error))

    def _run_call(self, call: _Call) -> None:
        try:
            result = call.fn(self.engine)
        except Exception as error:  # the caller's to handle (a bad path, a wrong state)
            self._post(functools.partial(_settle, call.future, None, error))
            return
        # Requests that the call finished (pause with mode="abort") reach their streams.
        finished = [r for r in result if isinstance(r, RequestOutput)] if isinstance(result, list) else []
        if finished:
            self._post(lambda: self._deliver(finished, None))
        self._post(functools.partial(_settle, call.future, result, None))

    def _publish_stats(self) -> None:
        stats = self.engine.stats()
        with self._stats_lock:
            self._stats = stats

    def _post(self, callback: Callable[[], None]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
                loop.call_soon_threadsafe(callback)

    # ------------------------------------------------- event-loop callbacks
    def _added(self, num_seqs: int) -> None:
        self._pending_seqs -= num_seqs

    def _deliver(self, outputs: list[RequestOutput], step_seconds: float | None) -> None:
        if step_seconds is not None:
            self.observer.on_step(step_seconds)
        now = time.monotonic()
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # the client left; its abort is queued
            self.observer.on_output(output, now, self._progress.get(output.request_id))
            self._progress[output.request_id] = StreamProgress(sum(len(c.token_ids) for c in output.outputs), now)
            if output.error is not None:
                stream.push(RequestFailedError(output.request_id, output.error))
            else:
                stream.push(output)

    def _deliver_error(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.push(error)

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.push(error)


class RequestStream:
    """The outputs of one request, in order; iterate with ``async for``.

    An engine error arrives as an exception from the iteration. ``close()``
    (idempotent; also run when iteration ends or is cancelled) aborts the
    request in the engine if it has not finished.
    """

    def __init__(self, request_id: str, release: Callable[[RequestStream], None]) -> None:
        self.request_id = request_id
        self.finished = False
        self._release = release
        self._queue: asyncio.Queue[RequestOutput | BaseException | None] = asyncio.Queue()
        self._closed = False

    def push(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._release(self)
        self._queue.put_nowait(None)  # wakes a pending iteration, which then ends

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self._queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    self.finished = True  # the engine no longer holds it
                    raise item
                self.finished = item.finished
                yield item
        finally:
            self.close()

    async def final(self) -> RequestOutput:
        """Consume the stream; returns its last output."""
        last: RequestOutput | None = None
        async for output in self:
            last = output
        if last is None or not last.finished:
            raise asyncio.CancelledError(f"request {self.request_id} was closed before it finished")
        return last


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """Give ``future`` its result or error, unless its caller gave up on it already."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
