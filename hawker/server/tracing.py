"""Optional OpenTelemetry tracing: one span per finished request, with its phases as child spans.

Off by default. ``hawker serve --otel-tracing`` (or ``HAWKER_OTEL_TRACING=1``)
turns it on; the standard ``OTEL_*`` variables then choose the exporter
(``OTEL_TRACES_EXPORTER``: otlp, console or none), where it sends
(``OTEL_EXPORTER_OTLP_ENDPOINT`` ...), the service name
(``OTEL_SERVICE_NAME``, default "hawker"), sampling (``OTEL_TRACES_SAMPLER``)
and batching (``OTEL_BSP_*``). The OpenTelemetry packages are imported
only then, so a server without tracing needs none of them.

The spans are built when a request finishes, from the times the server
recorded (the engine's own timings), with explicit start and end times:
nothing is traced on the engine thread and a request costs one span
export however many tokens it made. A request span joins the trace of the
HTTP request's ``traceparent`` header when it has one.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from hawker.server.tracking import FinishedRequest, FinishedSink

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

REQUEST_SPAN = "hawker.request"
INSTRUMENTATION_NAME = "hawker"
_INSTALL_HINT = "pip install 'hawker[otel]' (opentelemetry-sdk and an OTLP exporter)"


def tracing_enabled_by_env(environ: dict[str, str] | None = None) -> bool:
    """Whether ``HAWKER_OTEL_TRACING`` asks for tracing (1, true, yes, on)."""
    value = (environ if environ is not None else os.environ).get("HAWKER_OTEL_TRACING", "")
    return value.strip().lower() in ("1", "true", "yes", "on")


class RequestTracer(FinishedSink):
    """Turns each finished request into a ``hawker.request`` span with queue / prefill / decode children."""

    def __init__(self, tracer: Tracer) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.tracer = tracer
        self._trace = trace  # imported here, not at module level: tracing is optional
        self._propagator = TraceContextTextMapPropagator()
        # Span times are wall-clock nanoseconds; the recorded ones are monotonic.
        self._wall_minus_monotonic_ns = time.time_ns() - time.monotonic_ns()

    def _ns(self, monotonic_s: float) -> int:
        return int(monotonic_s * 1e9) + self._wall_minus_monotonic_ns

    def on_finished(self, request: FinishedRequest) -> None:
        trace = self._trace
        parent = self._propagator.extract(dict(request.trace_carrier)) if request.trace_carrier else None
        span = self.tracer.start_span(
            REQUEST_SPAN,
            context=parent,
            kind=trace.SpanKind.INTERNAL,
            start_time=self._ns(request.arrival),
            attributes=_attributes(request),
        )
        inside = trace.set_span_in_context(span)
        for name, start, end in request.phases():
            phase = self.tracer.start_span(name, context=inside, start_time=self._ns(start))
            phase.end(end_time=self._ns(end))
        if request.finish_reason == "error":
            span.set_status(trace.Status(trace.StatusCode.ERROR, request.error or "error"))
        span.end(end_time=self._ns(request.finished))


def _attributes(request: FinishedRequest) -> dict[str, Any]:
    # gen_ai.* follow OpenTelemetry's semantic conventions for generative AI.
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat" if request.request_id.startswith("chatcmpl-") else "text_completion",
        "gen_ai.response.id": request.request_id,
        "gen_ai.response.finish_reasons": [request.finish_reason],
        "gen_ai.usage.input_tokens": request.prompt_tokens,
        "gen_ai.usage.output_tokens": request.output_tokens,
        "hawker.request.cached_tokens": request.cached_tokens,
        "hawker.request.total_s": request.total_s,
        "hawker.replica": request.replica,
    }
    if request.max_tokens is not None:
        attributes["gen_ai.request.max_tokens"] = request.max_tokens
    if request.ttft_s is not None:
        attributes["hawker.request.ttft_s"] = request.ttft_s
    if request.error is not None:
        attributes["error.type"] = request.finish_reason
    return attributes


def provider_from_env() -> TracerProvider:
    """A TracerProvider configured by the standard ``OTEL_*`` variables (see the module docstring).

    Raises RuntimeError naming the package to install when OpenTelemetry's
    SDK (or the exporter the variables ask for) is missing.
    """
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as error:
        raise RuntimeError(f"--otel-tracing needs the OpenTelemetry SDK ({error}): {_INSTALL_HINT}") from None
    # Resource.create() reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; without
    # either the service would be "unknown_service", so it is named "hawker" instead.
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "hawker"}))
    provider = TracerProvider(resource=resource)
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n.strip()]
    for name in names:
        if name == "none":
            continue
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    return provider


def _exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (hawker knows otlp, console, none)")
    environ = os.environ
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:  # http/protobuf, the specification's default
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as error:
        package = "opentelemetry-exporter-otlp-proto-" + ("grpc" if protocol == "grpc" else "http")
        raise RuntimeError(f"OTLP trace export needs {package} ({error}): pip install {package}") from None
    # Endpoint, headers, timeout and compression come from OTEL_EXPORTER_OTLP_* variables.
    return OTLPSpanExporter()
