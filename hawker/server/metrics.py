"""Prometheus metrics (prefix ``hawker:``) in a registry owned by one server.

Besides ``hawker:``, the gauges a gateway routes by (queue depth, running
requests, KV-cache use) are also exposed under the names of the Gateway API
Inference Extension's model-server protocol (``vllm:num_requests_waiting``,
``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc``).

Gauges and engine counters are read from ``EngineStats`` snapshots at
scrape time (a custom collector), so they can never drift from the engines;
latency histograms are observed as outputs reach the event loop.

With data-parallel replicas every engine series carries a ``replica`` label
(one series per replica; ``sum()`` them for the server's total, as the
latency histograms already are); with one replica the series keep their
unlabelled names. ``hawker:router_requests_total{replica, reason}`` counts
where each request was routed and why. ``hawker:http_errors_total{status,
type}`` counts error responses by HTTP status and OpenAI error type (a
client that left gets none: those requests count as aborted).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hawker.engine.async_engine import StreamProgress
from hawker.engine.engine import EngineStats
from hawker.outputs import RequestOutput
from hawker.server.errors import error_type
from hawker.server.router import ROUTE_REASONS, ReplicaRouter, RouteDecision, RouterObserver
from hawker.server.tracking import finish_reason_label

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


_GAUGES: tuple[tuple[str, str, Callable[[EngineStats], float]], ...] = (
    ("hawker:num_requests_running", "Sequences in the running batch.", lambda s: s.num_running),
    ("hawker:num_requests_waiting", "Sequences waiting to be scheduled.", lambda s: s.num_waiting),
    ("hawker:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).", lambda s: s.kv_cache_usage),
)
_COUNTERS: tuple[tuple[str, str, Callable[[EngineStats], float]], ...] = (
    ("hawker:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", lambda s: s.prefix_cache_queries),
    ("hawker:prefix_cache_hits", "Prompt tokens found in the prefix cache.", lambda s: s.prefix_cache_hits),
    ("hawker:num_preemptions", "Sequences preempted (recomputed later).", lambda s: s.num_preemptions),
    ("hawker:prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded).", lambda s: s.prompt_tokens),
    ("hawker:generation_tokens", "Tokens generated.", lambda s: s.generation_tokens),
    ("hawker:engine_steps", "Engine steps run.", lambda s: s.num_steps),
    ("hawker:request_failures", "Requests failed by an engine error.", lambda s: s.num_failed_requests),
    # Structured outputs: mask seconds / masked steps is the mask time per step.
    ("hawker:structured_requests", "Requests under a structured-output constraint.", lambda s: s.constrained_requests),
    ("hawker:grammar_compiles", "Constraints compiled (cache misses).", lambda s: s.grammar_compiles),
    ("hawker:grammar_cache_hits", "Constrained requests whose constraint was cached.", lambda s: s.grammar_cache_hits),
    (
        "hawker:grammar_compile_failures",
        "Constraints refused: invalid, or over the time limit.",
        lambda s: s.grammar_compile_failures,
    ),
    ("hawker:grammar_compile_seconds", "Seconds spent compiling constraints.", lambda s: s.grammar_compile_seconds),
    ("hawker:grammar_masked_steps", "Engine steps that computed token masks.", lambda s: s.masked_steps),
    (
        "hawker:grammar_mask_seconds",
        "Seconds filling token masks (overlapping the forward pass).",
        lambda s: s.mask_fill_seconds,
    ),
    (
        "hawker:grammar_mask_wait_seconds",
        "Seconds sampling waited for token masks (not overlapped).",
        lambda s: s.mask_wait_seconds,
    ),
)
# The names the Gateway API Inference Extension's endpoint picker reads (its model-server protocol, in
# vLLM's spelling, which llm-d and KServe gateways scrape by default): queue depth, running requests
# and KV-cache use, one unlabelled series for the whole server whatever its replicas, for routing.
_GATEWAY_GAUGES: tuple[tuple[str, str, Callable[[Sequence[EngineStats]], float]], ...] = (
    (
        "vllm:num_requests_waiting",
        "Sequences waiting, all replicas (gateway protocol: TotalQueuedRequests).",
        lambda stats: sum(s.num_waiting for s in stats),
    ),
    (
        "vllm:num_requests_running",
        "Sequences running, all replicas (gateway protocol: TotalRunningRequests).",
        lambda stats: sum(s.num_running for s in stats),
    ),
    (
        "vllm:kv_cache_usage_perc",
        "Fraction of KV cache blocks in use, 0-1, mean over replicas (gateway protocol: KVCacheUtilization).",
        lambda stats: sum(s.kv_cache_usage for s in stats) / max(1, len(stats)),
    ),
    (
        "vllm:gpu_cache_usage_perc",
        "The same as vllm:kv_cache_usage_perc, under the name earlier gateway releases read.",
        lambda stats: sum(s.kv_cache_usage for s in stats) / max(1, len(stats)),
    ),
)
_HEALTHY_DOC = "1 while the engine loop runs, 0 once it died."
_WARMING_UP_DOC = "1 while the compiled decode step is built in the background (steps run eager), else 0."


class _EngineCollector(Collector):
    """One series per replica: labelled ``replica`` when there are several, unlabelled for one."""

    def __init__(
        self,
        stats: Callable[[], Sequence[EngineStats]],
        healthy: Callable[[], Sequence[bool]],
        warming_up: Callable[[], Sequence[bool]],
    ) -> None:
        self._stats = stats
        self._healthy = healthy
        self._warming_up = warming_up

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        healthy = self._healthy()
        for name, doc, read in _GAUGES:
            yield _family(GaugeMetricFamily, name, doc, [read(s) for s in stats])
        yield _family(GaugeMetricFamily, "hawker:engine_healthy", _HEALTHY_DOC, [float(h) for h in healthy])
        warming = [float(w) for w in self._warming_up()]
        yield _family(GaugeMetricFamily, "hawker:engine_warming_up", _WARMING_UP_DOC, warming)
        for name, doc, read in _COUNTERS:
            yield _family(CounterMetricFamily, name, doc, [read(s) for s in stats])
        for name, doc, total in _GATEWAY_GAUGES:
            yield GaugeMetricFamily(name, doc, value=total(stats))


def _family(
    kind: type[GaugeMetricFamily] | type[CounterMetricFamily], name: str, doc: str, values: Sequence[float]
) -> Metric:
    if len(values) == 1:
        return kind(name, doc, value=values[0])
    family = kind(name, doc, labels=["replica"])
    for index, value in enumerate(values):
        family.add_metric([str(index)], value)
    return family


class ServerMetrics(RouterObserver):
    """Owns the registry; the engines call it for every delivered output, the router for every route."""

    def __init__(
        self,
        stats: Callable[[], Sequence[EngineStats]],
        healthy: Callable[[], Sequence[bool]],
        num_replicas: int = 1,
        warming_up: Callable[[], Sequence[bool]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        warming = warming_up or (lambda: [False] * num_replicas)
        self.registry.register(_EngineCollector(stats, healthy, warming))
        self.time_to_first_token = Histogram(
            "hawker:time_to_first_token_seconds",
            "Arrival to first generated token.",
            registry=self.registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.inter_token_latency = Histogram(
            "hawker:inter_token_latency_seconds",
            "Time between successive outputs of a request.",
            registry=self.registry,
            buckets=_TOKEN_LATENCY_BUCKETS,
        )
        self.e2e_latency = Histogram(
            "hawker:e2e_request_latency_seconds",
            "Arrival to the last token.",
            registry=self.registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.queue_time = Histogram(
            "hawker:request_queue_time_seconds",
            "Arrival to first scheduled.",
            registry=self.registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.step_time = Histogram(
            "hawker:engine_step_seconds",
            "Wall time of one engine step.",
            registry=self.registry,
            buckets=_TOKEN_LATENCY_BUCKETS,
        )
        self.finished = Counter(
            "hawker:request_finished",
            "Requests finished, by finish reason (stop, length, abort, error).",
            ["finished_reason"],
            registry=self.registry,
        )
        self.routed = Counter(
            "hawker:router_requests",
            "Requests routed to each data-parallel replica, by reason (prefix_hit, least_loaded, balance).",
            ["replica", "reason"],
            registry=self.registry,
        )
        self.http_errors = Counter(
            "hawker:http_errors",
            "HTTP responses with an error status, by status and OpenAI error type.",
            ["status", "type"],
            registry=self.registry,
        )
        # Every series exists from the start at 0, so rate() sees the first request.
        for replica in range(num_replicas):
            for reason in ROUTE_REASONS:
                self.routed.labels(replica=str(replica), reason=reason)

    @classmethod
    def of(cls, router: ReplicaRouter) -> ServerMetrics:
        """The metrics of ``router``'s replicas, read live at every scrape."""
        return cls(router.replica_stats, router.replica_health, len(router.replicas), router.replica_warming_up)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def on_error_response(self, status: int) -> None:
        self.http_errors.labels(status=str(status), type=error_type(status)).inc()

    # ------------------------------------------------------ RouterObserver
    def on_route(self, decision: RouteDecision, num_requests: int) -> None:
        self.routed.labels(replica=str(decision.replica), reason=decision.reason).inc(num_requests)

    def on_step(self, seconds: float) -> None:
        self.step_time.observe(seconds)

    def on_output(self, output: RequestOutput, now: float, previous: StreamProgress | None) -> None:
        arrival = output.metrics.get("arrival_time")
        num_tokens = sum(len(c.token_ids) for c in output.outputs)
        before = previous.num_tokens if previous is not None else 0
        if num_tokens > before:
            if before == 0 and arrival is not None:
                self.time_to_first_token.observe(now - arrival)
            elif previous is not None:
                self.inter_token_latency.observe(now - previous.time)
        if not output.finished:
            return
        if arrival is not None:
            self.e2e_latency.observe(now - arrival)
            scheduled = output.metrics.get("first_scheduled_time")
            if scheduled is not None:
                self.queue_time.observe(scheduled - arrival)
        self.finished.labels(finished_reason=finish_reason_label(output)).inc()

    def on_client_gone(self, request_id: str) -> None:
        del request_id
        self.finished.labels(finished_reason="abort").inc()
