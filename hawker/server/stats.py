"""The numbers behind ``GET /v1/stats`` and the dashboard, read from the Prometheus registry itself.

Every value here is computed from a snapshot of the same registry that
``/metrics`` renders, so the two cannot disagree: totals are its samples
with the ``replica`` label summed out (the KV-cache usage averaged, health
the minimum), and the chart points are differences between snapshots taken
once a second, exactly what Prometheus' ``rate()`` and
``histogram_quantile()`` compute from a scrape of ``/metrics`` (the
Grafana dashboard in deploy/grafana/ does just that).

A sampler task on the event loop keeps the last ``history_s`` seconds of
points, so a dashboard opened late still shows the last minutes.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field

from prometheus_client import CollectorRegistry

# (sample name, sorted (label, value) pairs without "replica")
SampleKey = tuple[str, tuple[tuple[str, str], ...]]

# Gauges whose server-wide value is not the sum over replicas.
_GAUGE_MEAN = frozenset({"hawker:kv_cache_usage_perc"})
_GAUGE_MIN = frozenset({"hawker:engine_healthy"})
LATENCIES = {
    "ttft": "hawker:time_to_first_token_seconds",
    "itl": "hawker:inter_token_latency_seconds",
    "e2e": "hawker:e2e_request_latency_seconds",
}


@dataclass(frozen=True)
class StatsConfig:
    """How often the dashboard's history is sampled, how much is kept, and the quantile window."""

    interval_s: float = 1.0
    history_s: float = 600.0
    # Latency quantiles and the prefix-cache hit rate are over this trailing window
    # (one second holds too few requests for a p99).
    window_s: float = 15.0

    def __post_init__(self) -> None:
        if not self.interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {self.interval_s}")
        if self.history_s < self.interval_s or self.window_s < self.interval_s:
            raise ValueError(f"history_s and window_s must be >= interval_s ({self.interval_s})")

    @property
    def window_samples(self) -> int:
        return max(1, round(self.window_s / self.interval_s))

    @property
    def history_points(self) -> int:
        return max(1, round(self.history_s / self.interval_s))


@dataclass(frozen=True)
class HistogramState:
    """A cumulative histogram: counts of observations <= each upper bound (the last is +Inf)."""

    upper_bounds: tuple[float, ...]
    cumulative: tuple[float, ...]
    count: float
    total: float

    def since(self, older: HistogramState | None) -> HistogramState:
        """The observations made after ``older`` was taken."""
        if older is None or older.upper_bounds != self.upper_bounds:
            return self
        cumulative = tuple(a - b for a, b in zip(self.cumulative, older.cumulative, strict=True))
        return HistogramState(self.upper_bounds, cumulative, self.count - older.count, self.total - older.total)

    def quantile(self, q: float) -> float | None:
        """Prometheus' ``histogram_quantile``: linear inside the bucket that holds rank q * count.

        None without observations; a rank in the +Inf bucket answers the
        highest finite bound, as Prometheus does.
        """
        if not self.cumulative or self.cumulative[-1] <= 0:
            return None
        rank = q * self.cumulative[-1]
        lower, below = 0.0, 0.0
        for upper, count in zip(self.upper_bounds, self.cumulative, strict=True):
            if count >= rank:
                if math.isinf(upper):
                    return lower
                if count == below:
                    return upper
                return lower + (upper - lower) * (rank - below) / (count - below)
            lower, below = upper, count
        return lower


@dataclass(frozen=True)
class MetricsSnapshot:
    """Every counter and gauge sample of the registry at one moment, the replica label summed out."""

    time: float  # time.time()
    monotonic: float
    values: Mapping[SampleKey, float]
    histograms: Mapping[str, HistogramState]  # by family name
    num_replicas: int

    def total(self, name: str) -> float:
        """A sample summed over all its labels (``hawker:request_finished_total`` over every reason)."""
        return sum(value for (sample, _), value in self.values.items() if sample == name)

    def split(self, name: str, label: str) -> dict[str, float]:
        """A sample summed by one label's values."""
        parts: dict[str, float] = defaultdict(float)
        for (sample, labels), value in self.values.items():
            if sample == name:
                parts[dict(labels).get(label, "")] += value
        return dict(parts)

    def as_json(self) -> dict[str, float]:
        """The samples keyed as /metrics writes them: ``name`` or ``name{label="value",...}``."""
        return {_sample_text(key): value for key, value in sorted(self.values.items())}


def _sample_text(key: SampleKey) -> str:
    name, labels = key
    if not labels:
        return name
    inner = ",".join(f'{label}="{value}"' for label, value in labels)
    return f"{name}{{{inner}}}"


def read_snapshot(registry: CollectorRegistry) -> MetricsSnapshot:
    """Collect the registry once (the engine gauges are read from the replicas' stats now)."""
    sums: dict[SampleKey, float] = defaultdict(float)
    per_replica: dict[SampleKey, list[float]] = defaultdict(list)
    buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    replicas: set[str] = set()
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue  # creation timestamps, not values
            if "replica" in sample.labels:
                replicas.add(sample.labels["replica"])
            if family.type == "histogram" and sample.name.endswith("_bucket"):
                buckets[family.name][float(sample.labels["le"])] += sample.value
                continue
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "replica"))
            key = (sample.name, labels)
            sums[key] += sample.value
            per_replica[key].append(sample.value)
    values = dict(sums)
    for key, observed in per_replica.items():
        if key[0] in _GAUGE_MEAN:
            values[key] = sum(observed) / len(observed)
        elif key[0] in _GAUGE_MIN:
            values[key] = min(observed)
    histograms = {name: _histogram(name, bounds, values) for name, bounds in buckets.items()}
    return MetricsSnapshot(time.time(), time.monotonic(), values, histograms, max(1, len(replicas)))


def _histogram(name: str, bounds: Mapping[float, float], values: Mapping[SampleKey, float]) -> HistogramState:
    upper = tuple(sorted(bounds))
    return HistogramState(
        upper_bounds=upper,
        cumulative=tuple(bounds[b] for b in upper),
        count=values.get((f"{name}_count", ()), 0.0),
        total=values.get((f"{name}_sum", ()), 0.0),
    )


@dataclass(frozen=True)
class ChartPoint:
    """One second of the dashboard's charts; rates are per second over the last sampling interval."""

    t: float
    seconds: float  # the interval the rates are over (a sample may come late)
    prompt_tps: float
    generation_tps: float
    running: float
    waiting: float
    kv_usage: float  # 0-1, mean over replicas
    prefix_hit_rate: float | None  # over the window; None without prompt lookups
    preemptions: float  # per second
    ttft_p50: float | None
    ttft_p99: float | None
    itl_p50: float | None
    itl_p99: float | None
    e2e_p50: float | None
    e2e_p99: float | None
    errors: dict[str, float] = field(default_factory=dict)  # per second, by type


def chart_point(now: MetricsSnapshot, previous: MetricsSnapshot, window_start: MetricsSnapshot) -> ChartPoint:
    """The chart values at ``now``: rates since ``previous``, quantiles and hit rate since ``window_start``."""
    seconds = max(now.monotonic - previous.monotonic, 1e-9)

    def rate(name: str) -> float:
        return max(0.0, now.total(name) - previous.total(name)) / seconds

    latencies: dict[str, float | None] = {}
    for short, name in LATENCIES.items():
        recent = now.histograms[name].since(window_start.histograms.get(name)) if name in now.histograms else None
        latencies[f"{short}_p50"] = None if recent is None else recent.quantile(0.5)
        latencies[f"{short}_p99"] = None if recent is None else recent.quantile(0.99)
    queries = now.total("hawker:prefix_cache_queries_total") - window_start.total("hawker:prefix_cache_queries_total")
    hits = now.total("hawker:prefix_cache_hits_total") - window_start.total("hawker:prefix_cache_hits_total")
    return ChartPoint(
        t=now.time,
        seconds=seconds,
        prompt_tps=rate("hawker:prompt_tokens_total"),
        generation_tps=rate("hawker:generation_tokens_total"),
        running=now.total("hawker:num_requests_running"),
        waiting=now.total("hawker:num_requests_waiting"),
        kv_usage=now.total("hawker:kv_cache_usage_perc"),
        prefix_hit_rate=hits / queries if queries > 0 else None,
        preemptions=rate("hawker:num_preemptions_total"),
        errors=_error_rates(now, previous, seconds),
        **latencies,
    )


def error_counts(snapshot: MetricsSnapshot) -> dict[str, float]:
    """Errors so far by type: HTTP error responses by OpenAI error type, engine failures, aborted requests."""
    counts = {f"http {kind}": n for kind, n in snapshot.split("hawker:http_errors_total", "type").items()}
    finished = snapshot.split("hawker:request_finished_total", "finished_reason")
    counts["engine error"] = finished.get("error", 0.0)
    counts["aborted"] = finished.get("abort", 0.0)
    return counts


def _error_rates(now: MetricsSnapshot, previous: MetricsSnapshot, seconds: float) -> dict[str, float]:
    before = error_counts(previous)
    return {kind: max(0.0, n - before.get(kind, 0.0)) / seconds for kind, n in error_counts(now).items()}


class StatsHistory:
    """The dashboard's last minutes: one ChartPoint per sampling interval (lives on the event loop)."""

    def __init__(self, read: Callable[[], MetricsSnapshot], config: StatsConfig | None = None) -> None:
        self.read = read
        self.config = config or StatsConfig()
        # The newest snapshot and enough older ones to reach back one window.
        self._snapshots: deque[MetricsSnapshot] = deque(maxlen=self.config.window_samples + 1)
        self._points: deque[ChartPoint] = deque(maxlen=self.config.history_points)

    def sample(self) -> ChartPoint | None:
        """Take a snapshot; returns the new point (None for the very first snapshot)."""
        snapshot = self.read()
        point = None
        if self._snapshots:
            point = chart_point(snapshot, self._snapshots[-1], self._snapshots[0])
            self._points.append(point)
        self._snapshots.append(snapshot)
        return point

    def points(self, since: float | None = None) -> list[ChartPoint]:
        """The kept points newer than ``since`` (a ``t`` value; None = all)."""
        return [p for p in self._points if since is None or p.t > since]

    async def run(self) -> None:
        """Sample every ``interval_s`` until cancelled (the app's lifespan starts and cancels it)."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            self.sample()
            next_at += self.config.interval_s
            # After a stall (a long blocking call on the loop), skip the missed ticks.
            next_at = max(next_at, loop.time())
            await asyncio.sleep(next_at - loop.time())


def points_json(points: Iterable[ChartPoint]) -> list[dict]:
    return [asdict(point) for point in points]
