"""The live dashboard, /v1/stats, request tracing and request logs, on an in-process server.

The browser test drives Debian's headless Chromium through Playwright
(``bash scripts/setup.sh test`` installs both); it fails, never skips, when
Chromium is missing.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from hawker.cli import build_parser
from hawker.engine.engine import EngineStats
from hawker.options import EngineOptions
from hawker.server.app import ServerSettings, build_app
from hawker.server.dashboard import PANELS
from hawker.server.metrics import ServerMetrics
from hawker.server.router import ReplicaRouter
from hawker.server.serve import ServeOptions, build_router
from hawker.server.stats import HistogramState, StatsConfig, read_snapshot
from hawker.server.tracing import REQUEST_SPAN, RequestTracer, provider_from_env, tracing_enabled_by_env
from hawker.server.tracking import FinishedRequest, logfmt
from tests.support.server_process import serve_in_process
from tests.support.tiny_models import VOCAB_SIZE

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "deploy" / "grafana" / "hawker.json"
# Where the browser test leaves its screenshot for a reviewer (git ignores tmp/).
SCREENSHOT = REPO / "tmp" / "dashboard-test.png"
MAX_NUM_SEQS = 3


# ----------------------------------------------------------------- server
@dataclass
class _Server:
    base_url: str
    router: ReplicaRouter
    spans: InMemorySpanExporter

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.base_url}{path}", timeout=10)

    def complete(self, prompt: list[int], max_tokens: int, stream: bool = False, **extra: object) -> dict:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}
        headers = extra.pop("headers", None)
        body.update(extra)
        if not stream:
            response = httpx.post(f"{self.base_url}/v1/completions", json=body, headers=headers, timeout=60)
            response.raise_for_status()
            return response.json()
        body["stream_options"] = {"include_usage": True}
        usage: dict = {}
        with httpx.stream(
            "POST", f"{self.base_url}/v1/completions", json=body, headers=headers, timeout=60
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
        return {"usage": usage}

    def wait_idle(self, within: float = 20.0) -> None:
        deadline = time.monotonic() + within
        while self.get("/v1/stats").json()["requests_in_flight"]:
            assert time.monotonic() < deadline, f"requests still in flight after {within} s"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def server(tiny_checkpoints: dict[str, Path]) -> Iterator[_Server]:
    """`hawker serve` with tracing on, in this process so that the test can read its spans."""
    engine = EngineOptions(
        model=str(tiny_checkpoints["llama"]),
        dtype="float32",
        block_size=4,
        kv_cache_memory_gb=0.02,
        max_num_seqs=MAX_NUM_SEQS,
    )
    router = build_router(ServeOptions(engine=engine))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = RequestTracer(provider.get_tracer("hawker-test"))
    app = build_app(router, ServerSettings(served_model_name="tiny", stats=StatsConfig(interval_s=0.5)), tracer)
    try:
        with serve_in_process(app) as base_url:
            yield _Server(base_url, router, exporter)
    finally:
        provider.shutdown()


def _prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(3, VOCAB_SIZE) for _ in range(length)]


class _Workload:
    """Streams long completions from a few threads until stopped, so requests are always in flight."""

    def __init__(self, server: _Server, clients: int = MAX_NUM_SEQS + 2) -> None:
        self.server = server
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(clients)
        self.futures = [self.pool.submit(self._client, seed) for seed in range(clients)]

    def _client(self, seed: int) -> int:
        rng = random.Random(seed)
        done = 0
        while not self.stop.is_set():
            self.server.complete(_prompt(rng, rng.randrange(8, 40)), max_tokens=rng.randrange(120, 200), stream=True)
            done += 1
        return done

    def finish(self) -> int:
        self.stop.set()
        finished = sum(future.result(timeout=60) for future in self.futures)
        self.pool.shutdown()
        return finished


# ---------------------------------------------------------- browser test
def _chromium() -> str:
    path = os.environ.get("HAWKER_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail(
            "Debian's chromium is not installed (the dashboard test drives it through Playwright): "
            "run `bash scripts/setup.sh test`, or apt-get install chromium, or set HAWKER_CHROMIUM"
        )
    return path


def test_dashboard_moves_and_lists_requests_in_flight_in_a_browser(server: _Server) -> None:
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    workload = _Workload(server)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=_chromium(), headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.goto(f"{server.base_url}/dashboard")
            page.wait_for_selector("body[data-updates]", timeout=10_000)
            page.select_option("#window", "60")  # the server is young: one minute shows its points wider
            assert page.inner_text("#status") == "live"
            titles = page.locator(".chart h3").all_inner_texts()
            assert titles == [panel["title"] for panel in json.loads(PANELS.read_text())["panels"]]

            # The table fills: requests decoding, and (past max_num_seqs) waiting.
            page.wait_for_function("document.querySelectorAll('#inflight tbody tr').length >= 2", timeout=20_000)
            states = set(page.locator("#inflight tbody tr").evaluate_all("rows => rows.map(r => r.dataset.state)"))
            assert states <= {"queued", "waiting", "prefill", "decode", "preempted"}, states
            assert "decode" in states or "prefill" in states, states
            first_id = page.inner_text("#inflight tbody tr td.id")
            assert first_id.startswith("cmpl-")

            # The charts move: more points, and the tokens chart's pixels change.
            canvas = "#chart-tokens canvas"
            before_points = int(page.get_attribute("#chart-tokens", "data-points") or 0)
            before_pixels = page.eval_on_selector(canvas, "c => c.toDataURL()")
            page.wait_for_function(
                f"Number(document.querySelector('#chart-tokens').dataset.points) >= {before_points + 3}",
                timeout=15_000,
            )
            assert page.eval_on_selector(canvas, "c => c.toDataURL()") != before_pixels
            generation = page.inner_text("#tile-generation")
            assert re.match(r"^[\d.]+k? tok/s$", generation) and not generation.startswith("0 "), generation
            assert page.inner_text("#tile-kv").endswith("%")

            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            browser.close()
    finally:
        finished = workload.finish()
    assert finished > 0
    assert not problems, problems
    assert SCREENSHOT.stat().st_size > 20_000
    print(f"dashboard screenshot: {SCREENSHOT}")


# ----------------------------------------- /v1/stats against /metrics
def _metrics_by_series(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]:
    """/metrics samples grouped as /v1/stats groups them: the replica label taken out (values per replica)."""
    series: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith(("_created", "_bucket")):
                continue
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "replica"))
            series.setdefault((sample.name, labels), []).append(sample.value)
    return series


def _server_total(name: str, per_replica: list[float]) -> float:
    if name == "hawker:kv_cache_usage_perc":
        return sum(per_replica) / len(per_replica)
    if name == "hawker:engine_healthy":
        return min(per_replica)
    return sum(per_replica)


def _assert_stats_match_metrics(stats: dict, metrics_text: str) -> None:
    expected = {}
    for (name, labels), values in _metrics_by_series(metrics_text).items():
        key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else "")
        expected[key] = _server_total(name, values)
    assert stats["totals"] == pytest.approx(expected)


def test_stats_and_metrics_agree_after_a_workload(server: _Server) -> None:
    rng = random.Random(7)
    shared = _prompt(rng, 24)
    with ThreadPoolExecutor(4) as pool:
        list(
            pool.map(lambda i: server.complete([*shared, *_prompt(rng, 5)], max_tokens=12, stream=i % 2 == 0), range(8))
        )
    with pytest.raises(httpx.HTTPStatusError):
        server.complete([VOCAB_SIZE + 5], max_tokens=4)  # a 400: counted as an HTTP error
    server.wait_idle()
    stats = server.get("/v1/stats").json()
    _assert_stats_match_metrics(stats, server.get("/metrics").text)

    totals = stats["totals"]
    assert totals["hawker:generation_tokens_total"] > 0
    assert totals["hawker:prefix_cache_hits_total"] > 0
    assert totals['hawker:http_errors_total{status="400",type="invalid_request_error"}'] >= 1
    assert totals["hawker:num_requests_running"] == 0 and totals["hawker:kv_cache_usage_perc"] == 0
    assert stats["requests"] == [] and stats["requests_in_flight"] == 0

    # The charts are the same counters: their rates add back up to the totals.
    time.sleep(1.2)  # a sample after the last token
    stats = server.get("/v1/stats").json()
    series = stats["series"]
    for rate, total in (("generation_tps", "generation_tokens_total"), ("prompt_tps", "prompt_tokens_total")):
        integrated = sum(p[rate] * p["seconds"] for p in series)
        assert integrated == pytest.approx(stats["totals"][f"hawker:{total}"], rel=1e-6)
    assert any(p["ttft_p99"] is not None for p in series)
    assert any(p["errors"].get("http invalid_request_error", 0) > 0 for p in series)
    since = series[-3]["t"]
    newer = server.get(f"/v1/stats?since={since}").json()["series"]
    # The sampler may have added a point between the two requests: compare what both saw.
    assert newer[:2] == series[-2:] and all(p["t"] > since for p in newer)


def test_stats_sum_replica_labelled_series_as_metrics_do() -> None:
    """With data-parallel replicas every engine series is labelled; /v1/stats gives the server's total."""

    def stats(running: int, usage: float, tokens: int) -> EngineStats:
        zero = {field.name: 0 for field in dataclasses.fields(EngineStats)}
        return EngineStats(**(zero | {"num_running": running, "kv_cache_usage": usage, "generation_tokens": tokens}))

    replicas = [stats(3, 0.5, 100), stats(1, 0.25, 40)]
    metrics = ServerMetrics(lambda: replicas, lambda: [True, False], num_replicas=2)
    metrics.time_to_first_token.observe(0.2)
    metrics.on_error_response(429)
    snapshot = read_snapshot(metrics.registry)
    stats_json = {"totals": snapshot.as_json()}
    _assert_stats_match_metrics(stats_json, metrics.render().decode())
    totals = stats_json["totals"]
    assert totals["hawker:num_requests_running"] == 4
    assert totals["hawker:generation_tokens_total"] == 140
    assert totals["hawker:kv_cache_usage_perc"] == pytest.approx(0.375)
    assert totals["hawker:engine_healthy"] == 0
    # What a Gateway API Inference Extension endpoint picker reads: the whole server, unlabelled.
    gateway = {
        family.name: family.samples
        for family in text_string_to_metric_families(metrics.render().decode())
        if family.name.startswith("vllm:")
    }
    assert {name: [(s.labels, s.value) for s in samples] for name, samples in gateway.items()} == {
        "vllm:num_requests_waiting": [({}, 0.0)],
        "vllm:num_requests_running": [({}, 4.0)],
        "vllm:kv_cache_usage_perc": [({}, 0.375)],
        "vllm:gpu_cache_usage_perc": [({}, 0.375)],
    }
    assert totals['hawker:http_errors_total{status="429",type="rate_limit_error"}'] == 1
    assert snapshot.num_replicas == 2


def test_histogram_quantile_is_prometheus_interpolation() -> None:
    bounds = (0.1, 0.5, 1.0, math.inf)
    histogram = HistogramState(bounds, (10.0, 30.0, 40.0, 40.0), count=40, total=12.0)
    assert histogram.quantile(0.25) == pytest.approx(0.1)  # rank 10: the top of the first bucket
    assert histogram.quantile(0.5) == pytest.approx(0.1 + 0.4 * (20 - 10) / 20)
    assert histogram.quantile(0.99) == pytest.approx(0.5 + 0.5 * (39.6 - 30) / 10)
    older = HistogramState(bounds, (10.0, 10.0, 10.0, 10.0), count=10, total=1.0)
    assert histogram.since(older).quantile(0.5) == pytest.approx(0.1 + 0.4 * 15 / 20)
    assert histogram.since(histogram).quantile(0.5) is None
    overflow = HistogramState(bounds, (0.0, 0.0, 0.0, 5.0), count=5, total=50.0)
    assert overflow.quantile(0.5) == 1.0  # in +Inf: the highest finite bound


# ------------------------------------------------------ tracing and logs
def _spans_by_request(spans: list[ReadableSpan]) -> dict[str, tuple[ReadableSpan, list[ReadableSpan]]]:
    roots = {s.context.span_id: s for s in spans if s.name == REQUEST_SPAN}
    children: dict[int, list[ReadableSpan]] = {span_id: [] for span_id in roots}
    for span in spans:
        if span.name != REQUEST_SPAN:
            assert span.parent is not None and span.parent.span_id in roots, span.name
            children[span.parent.span_id].append(span)
    return {
        root.attributes["gen_ai.response.id"]: (root, sorted(children[span_id], key=lambda s: s.start_time))
        for span_id, root in roots.items()
    }


def test_each_request_gets_one_span_with_its_phases_and_a_log_line(
    server: _Server, caplog: pytest.LogCaptureFixture
) -> None:
    server.wait_idle()
    server.spans.clear()
    rng = random.Random(3)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traceparent = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    with caplog.at_level(logging.INFO, logger="hawker.requests"):
        results = [
            server.complete(_prompt(rng, 10), max_tokens=6),
            server.complete(_prompt(rng, 17), max_tokens=9, stream=True),
            server.complete(_prompt(rng, 5), max_tokens=4, headers=traceparent),
            server.complete(_prompt(rng, 7), max_tokens=3, n=2),
        ]
        server.wait_idle()
    by_request = _spans_by_request(server.spans.get_finished_spans())
    assert len(by_request) == len(results)
    ids = [r["id"] for r in results[:1]] + [r["id"] for r in results[2:]]
    assert set(ids) <= set(by_request)

    for result in results:
        usage = result["usage"]
        matches = [
            (root, phases)
            for root, phases in by_request.values()
            if root.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
            and root.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
        ]
        assert len(matches) == 1, usage
        root, phases = matches[0]
        assert [p.name for p in phases] == ["queue", "prefill", "decode"]
        # The phases tile the request span: each starts where the one before ended.
        assert phases[0].start_time == root.start_time and phases[-1].end_time == root.end_time
        for before, after in itertools.pairwise(phases):
            assert before.end_time == after.start_time
        assert all(p.end_time >= p.start_time for p in phases)
        assert root.attributes["gen_ai.response.finish_reasons"] == ("length",)
        assert 0 < root.attributes["hawker.request.ttft_s"] <= root.attributes["hawker.request.total_s"]
        assert root.status.is_ok

    traced = by_request[results[2]["id"]][0]
    assert format(traced.context.trace_id, "032x") == trace_id  # joined the caller's trace
    assert by_request[results[2]["id"]][0].parent.span_id == int("00f067aa0ba902b7", 16)

    lines = [r for r in caplog.records if r.name == "hawker.requests"]
    assert len(lines) == len(results)
    for record in lines:
        fields = record.hawker_request
        assert set(fields) >= {"id", "prompt_tokens", "output_tokens", "ttft_s", "total_s", "finish_reason"}
        assert f"id={fields['id']}" in record.getMessage() and "finish_reason=length" in record.getMessage()


def test_an_aborted_request_is_traced_and_logged_as_aborted(server: _Server, caplog: pytest.LogCaptureFixture) -> None:
    server.wait_idle()
    server.spans.clear()
    body = {"model": "tiny", "prompt": _prompt(random.Random(5), 12), "max_tokens": 200, "ignore_eos": True}
    with caplog.at_level(logging.INFO, logger="hawker.requests"):
        with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body | {"stream": True}, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    break  # leave after the first token
        server.wait_idle()
    ((root, phases),) = _spans_by_request(server.spans.get_finished_spans()).values()
    assert root.attributes["gen_ai.response.finish_reasons"] == ("abort",)
    assert [p.name for p in phases] == ["queue", "prefill", "decode"]
    (record,) = [r for r in caplog.records if r.name == "hawker.requests"]
    assert record.hawker_request["finish_reason"] == "abort"


def test_finished_request_phases_and_logfmt() -> None:
    waiting = FinishedRequest("r", 0, 5, 0, 0, None, 1.0, None, None, 3.0, "abort", "the client went away")
    assert waiting.phases() == [("queue", 1.0, 3.0)] and waiting.ttft_s is None
    done = FinishedRequest("r", 0, 5, 4, 0, 4, 1.0, 1.5, 2.0, 3.0, "length")
    assert done.phases() == [("queue", 1.0, 1.5), ("prefill", 1.5, 2.0), ("decode", 2.0, 3.0)]
    line = logfmt(done.log_fields())
    assert (
        line
        == "id=r replica=0 prompt_tokens=5 output_tokens=4 cached_tokens=0 ttft_s=1.0 total_s=2.0 finish_reason=length"
    )
    assert logfmt({"error": 'bad "x" = y', "ttft_s": None}) == 'error="bad \\"x\\" = y" ttft_s=-'


def test_tracing_setup_from_the_standard_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    provider = provider_from_env()
    assert provider.resource.attributes["service.name"] == "hawker"
    provider.shutdown()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "my-llm")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    provider = provider_from_env()
    assert provider.resource.attributes["service.name"] == "my-llm"
    provider.shutdown()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    provider_from_env().shutdown()  # the OTLP/HTTP exporter of hawker[otel]; exports nothing here
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkinx")
    with pytest.raises(ValueError, match="unknown exporter 'zipkinx'"):
        provider_from_env()
    assert tracing_enabled_by_env({"HAWKER_OTEL_TRACING": "1"}) and not tracing_enabled_by_env({})
    # Without the SDK, a clear message says what to install.
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with pytest.raises(RuntimeError, match=r"pip install 'hawker\[otel\]'"):
        provider_from_env()


def test_serve_flags() -> None:
    args = build_parser().parse_args(["serve", "--otel-tracing", "--request-log-level", "off"])
    assert args.otel_tracing and args.request_log_level == "off"
    defaults = build_parser().parse_args(["serve"])
    assert not defaults.otel_tracing and defaults.request_log_level == "info"
    with pytest.raises(ValueError, match="request_log_level"):
        ServeOptions(engine=EngineOptions(), request_log_level="loud")


# ----------------------------------------------------------------- Grafana
def _exposed_sample_names(metrics: ServerMetrics) -> set[str]:
    names = set()
    for family in metrics.registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names.update(family.name + suffix for suffix in suffixes)
    return names


def test_grafana_dashboard_has_the_same_panels_over_real_metric_names() -> None:
    dashboard = json.loads(GRAFANA.read_text())
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    page_titles = [panel["title"] for panel in json.loads(PANELS.read_text())["panels"]]
    assert set(page_titles) <= {p["title"] for p in panels}

    zero = EngineStats(**{field.name: 0 for field in dataclasses.fields(EngineStats)})
    exposed = _exposed_sample_names(ServerMetrics(lambda: [zero], lambda: [True]))
    for panel in panels:
        exprs = [target["expr"] for target in panel.get("targets", [])]
        assert exprs, panel["title"]
        for expr in exprs:
            used = set(re.findall(r"hawker:[a-z0-9_]+", expr))
            assert used and used <= exposed, (panel["title"], used - exposed)
