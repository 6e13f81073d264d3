"""Requests in flight as the server sees them, and one record of each finished request.

The dashboard's in-flight table, the request log and the tracing spans all
come from here. The router calls the observer hooks on the event loop, so
the records need no lock. A request's state (waiting, prefill, decode,
preempted) is read from its replica's scheduler when the table is asked
for: single attribute reads of an object the engine thread owns, which may
be a step stale but never torn.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from hawker.engine.async_engine import StreamProgress, Submission
from hawker.outputs import RequestOutput
from hawker.server.router import RouterObserver


@dataclass
class _Live:
    """What the server knows of one request in flight (mutated on the event loop only)."""

    request_id: str
    replica: int
    arrival: float  # time.monotonic(), as the engine's own request timings
    prompt_tokens: int
    max_tokens: int | None
    output_tokens: int = 0
    cached_tokens: int = 0
    first_scheduled: float | None = None
    first_token: float | None = None
    # W3C trace-context headers of the HTTP request, kept only while tracing is on.
    trace_carrier: Mapping[str, str] | None = None


@dataclass(frozen=True)
class FinishedRequest:
    """One finished request, for the request log and its trace span. Times are time.monotonic()."""

    request_id: str
    replica: int
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    max_tokens: int | None
    arrival: float
    first_scheduled: float | None
    first_token: float | None
    finished: float
    finish_reason: str
    error: str | None = None
    trace_carrier: Mapping[str, str] | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def total_s(self) -> float:
        return self.finished - self.arrival

    def phases(self) -> list[tuple[str, float, float]]:
        """(name, start, end) of queue, prefill and decode; a request that ended early has fewer.

        queue: arrival to first scheduled; prefill: to the first token reaching
        the server; decode: to the end. A request aborted while waiting has
        only its queue phase, cut short at the end.
        """
        marks = [("queue", self.arrival), ("prefill", self.first_scheduled), ("decode", self.first_token)]
        present = [(name, start) for name, start in marks if start is not None]
        ends = [start for _, start in present[1:]] + [self.finished]
        return [(name, start, max(start, end)) for (name, start), end in zip(present, ends, strict=True)]

    def log_fields(self) -> dict[str, str | int | float | None]:
        fields: dict[str, str | int | float | None] = {
            "id": self.request_id,
            "replica": self.replica,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "cached_tokens": self.cached_tokens,
            "ttft_s": None if self.ttft_s is None else round(self.ttft_s, 4),
            "total_s": round(self.total_s, 4),
            "finish_reason": self.finish_reason,
        }
        if self.error is not None:
            fields["error"] = self.error
        return fields


@dataclass(frozen=True)
class InFlightRow:
    """One row of the dashboard's in-flight table."""

    request_id: str
    replica: int
    age_s: float
    prompt_tokens: int
    output_tokens: int
    max_tokens: int | None
    state: str
    ttft_s: float | None


class FinishedSink:
    """Receives every finished request once (request log, tracer)."""

    def on_finished(self, request: FinishedRequest) -> None:
        del request


# (replica, request id) -> the request's state, read from that replica's scheduler.
StateLookup = Callable[[int, str], str]


class RequestTracker(RouterObserver):
    """Keeps a record of every request in flight; hands each one to the sinks when it ends."""

    def __init__(self, state_of: StateLookup, sinks: Sequence[FinishedSink] = (), keep_trace_context: bool = False):
        self._state_of = state_of
        self.sinks = tuple(sinks)
        self.keep_trace_context = keep_trace_context
        self._live: dict[str, _Live] = {}

    def __len__(self) -> int:
        return len(self._live)

    def attach_trace_context(self, request_ids: Sequence[str], headers: Mapping[str, str]) -> None:
        """Remember the HTTP request's trace-context headers, so the requests' spans join its trace."""
        if not self.keep_trace_context:
            return
        carrier = {k: v for k, v in headers.items() if k.lower() in ("traceparent", "tracestate")}
        for request_id in request_ids:
            live = self._live.get(request_id)
            if live is not None and carrier:
                live.trace_carrier = carrier

    def rows(self, now: float | None = None, limit: int = 100) -> list[InFlightRow]:
        """The oldest ``limit`` requests in flight, oldest first."""
        now = time.monotonic() if now is None else now
        oldest = sorted(self._live.values(), key=lambda live: live.arrival)[:limit]
        return [
            InFlightRow(
                request_id=live.request_id,
                replica=live.replica,
                age_s=max(0.0, now - live.arrival),
                prompt_tokens=live.prompt_tokens,
                output_tokens=live.output_tokens,
                max_tokens=live.max_tokens,
                state=self._state_of(live.replica, live.request_id),
                ttft_s=None if live.first_token is None else live.first_token - live.arrival,
            )
            for live in oldest
        ]

    # ------------------------------------------------------ RouterObserver
    def on_submitted(self, replica: int, submissions: Sequence[Submission]) -> None:
        now = time.monotonic()
        for item in submissions:
            params = item.params
            max_tokens = None if params.max_tokens is None else params.max_tokens * params.n
            self._live[item.request_id] = _Live(item.request_id, replica, now, len(item.prompt_token_ids), max_tokens)

    def on_output(self, output: RequestOutput, now: float, previous: StreamProgress | None) -> None:
        del previous
        live = self._live.get(output.request_id)
        if live is None:
            return
        timings = output.metrics
        live.arrival = timings.get("arrival_time", live.arrival)  # the engine's stamp, as the metrics use
        live.first_scheduled = timings.get("first_scheduled_time", live.first_scheduled)
        live.output_tokens = sum(len(c.token_ids) for c in output.outputs)
        live.cached_tokens = output.num_cached_tokens
        if live.output_tokens and live.first_token is None:
            live.first_token = now  # when it reached the server, as hawker:time_to_first_token_seconds
        if output.finished:
            self._finish(live, finish_reason_label(output), output.error, now)

    def on_client_gone(self, request_id: str) -> None:
        live = self._live.get(request_id)
        if live is not None:
            self._finish(live, "abort", "the client went away", time.monotonic())

    def on_stream_closed(self, request_id: str) -> None:
        # A stream that closes with its request still here ended without a
        # final output or a client leaving: the engine loop died under it.
        live = self._live.get(request_id)
        if live is not None:
            self._finish(live, "error", "the stream ended without a final output", time.monotonic())

    def _finish(self, live: _Live, reason: str, error: str | None, now: float) -> None:
        del self._live[live.request_id]
        finished = FinishedRequest(
            request_id=live.request_id,
            replica=live.replica,
            prompt_tokens=live.prompt_tokens,
            output_tokens=live.output_tokens,
            cached_tokens=live.cached_tokens,
            max_tokens=live.max_tokens,
            arrival=live.arrival,
            first_scheduled=live.first_scheduled,
            first_token=live.first_token,
            finished=now,
            finish_reason=reason,
            error=error,
            trace_carrier=live.trace_carrier,
        )
        for sink in self.sinks:
            sink.on_finished(finished)


def finish_reason_label(output: RequestOutput) -> str:
    """One reason for a finished request (the ``finished_reason`` label): error, abort, or the first sample's."""
    if output.error is not None:
        return "error"
    reasons = [c.finish_reason for c in output.outputs]
    return "abort" if "abort" in reasons else (reasons[0] or "unknown")


# ------------------------------------------------------------ request log
REQUEST_LOGGER = "hawker.requests"
REQUEST_LOG_LEVELS = ("debug", "info", "warning", "off")


class RequestLog(FinishedSink):
    """One logfmt line per finished request on the ``hawker.requests`` logger, at a chosen level.

    The fields also ride on the record as ``record.hawker_request`` (a dict),
    for a JSON log formatter to pick up without parsing the message.
    """

    def __init__(self, level: str = "info", logger: logging.Logger | None = None) -> None:
        if level not in REQUEST_LOG_LEVELS:
            raise ValueError(f"request log level must be one of {', '.join(REQUEST_LOG_LEVELS)}, got {level!r}")
        self.level = None if level == "off" else logging.getLevelNamesMapping()[level.upper()]
        self.logger = logger or logging.getLogger(REQUEST_LOGGER)

    def on_finished(self, request: FinishedRequest) -> None:
        if self.level is None or not self.logger.isEnabledFor(self.level):
            return
        fields = request.log_fields()
        self.logger.log(self.level, "request finished %s", logfmt(fields), extra={"hawker_request": fields})


def logfmt(fields: Mapping[str, str | int | float | None]) -> str:
    """key=value pairs; values with spaces, quotes or '=' are JSON-quoted, missing ones are '-'."""
    parts = []
    for key, value in fields.items():
        text = "-" if value is None else str(value)
        if not text or any(c in text for c in ' "=\\') or not text.isprintable():
            text = json.dumps(text, ensure_ascii=False)
        parts.append(f"{key}={text}")
    return " ".join(parts)
