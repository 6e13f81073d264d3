"""Prometheus metrics (prefix ``hawker:``) in a registry owned by one server.

Gauges and engine counters are read from an ``EngineStats`` snapshot at
scrape time (a custom collector), so they can never drift from the engine;
latency histograms are observed as outputs reach the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hawker.engine.async_engine import RequestObserver, StreamProgress
from hawker.engine.engine import EngineStats
from hawker.outputs import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats], healthy: Callable[[], bool]) -> None:
        self._stats = stats
        self._healthy = healthy

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        gauges = [
            ("hawker:num_requests_running", "Sequences in the running batch.", s.num_running),
            ("hawker:num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting),
            ("hawker:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).", s.kv_cache_usage),
            ("hawker:engine_healthy", "1 while the engine loop runs, 0 once it died.", float(self._healthy())),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = [
            ("hawker:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries),
            ("hawker:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
            ("hawker:num_preemptions", "Sequences preempted (recomputed later).", s.num_preemptions),
            ("hawker:prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded).", s.prompt_tokens),
            ("hawker:generation_tokens", "Tokens generated.", s.generation_tokens),
            ("hawker:engine_steps", "Engine steps run.", s.num_steps),
            ("hawker:request_failures", "Requests failed by an engine error.", s.num_failed_requests),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics(RequestObserver):
    """Owns the registry; the AsyncEngine calls it for every delivered output."""

    def __init__(self, stats: Callable[[], EngineStats], healthy: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats, healthy))
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

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ------------------------------------------------------ RequestObserver
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
        self.finished.labels(finished_reason=_finish_reason(output)).inc()

    def on_client_gone(self, request_id: str) -> None:
        del request_id
        self.finished.labels(finished_reason="abort").inc()


def _finish_reason(output: RequestOutput) -> str:
    if output.error is not None:
        return "error"
    reasons = [c.finish_reason for c in output.outputs]
    return "abort" if "abort" in reasons else (reasons[0] or "unknown")
