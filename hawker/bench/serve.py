"""`hawker bench serve`: latency and throughput of any OpenAI-compatible server.

Requests are streamed /v1/completions calls sent with Poisson arrivals at a
given rate (or all at once). Per request: TTFT (send -> first content chunk),
ITL (gaps between content chunks), TPOT ((e2e - TTFT) / (output tokens - 1))
and end-to-end latency. The output token count comes from the server's
usage chunk; a server that sends none (llama.cpp's) is counted from its
finish reason and content chunks.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from hawker.bench.workload import WorkItem


@dataclass(frozen=True)
class ServeBenchConfig:
    base_url: str
    model: str | None
    request_rate: float  # requests/s; math.inf sends everything at once
    arrival_seed: int = 0
    api_key: str | None = None
    timeout_s: float = 600.0
    # Sent as logit_bias -100 besides ignore_eos, for servers without
    # ignore_eos (llama.cpp's), so that every request runs to max_tokens.
    banned_token_ids: tuple[int, ...] = ()


@dataclass
class RequestRecord:
    ok: bool
    prompt_tokens: int
    output_tokens: int = 0
    cached_prompt_tokens: int = 0  # served from the server's prefix cache, when it says so
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Summary:
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        if not values:
            return cls(math.nan, math.nan, math.nan, math.nan)
        ordered = sorted(values)
        return cls(sum(ordered) / len(ordered), _pct(ordered, 50), _pct(ordered, 90), _pct(ordered, 99))


@dataclass(frozen=True)
class ServeBenchResult:
    request_rate: float
    num_requests: int
    completed: int
    failed: int
    duration_s: float
    input_tokens: int
    # Prompt tokens the server reported as prefix-cache hits: a run that
    # repeats a workload against a warm server measures the cache, not prefill.
    cached_input_tokens: int
    output_tokens: int
    request_throughput: float
    output_throughput: float
    ttft_s: Summary
    tpot_s: Summary
    itl_s: Summary
    e2e_s: Summary
    errors: list[str]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["request_rate"] = "inf" if math.isinf(self.request_rate) else self.request_rate
        return data

    def report(self) -> str:
        rate = "all at once" if math.isinf(self.request_rate) else f"{self.request_rate:g} req/s"
        lines = [
            f"rate {rate}: {self.completed}/{self.num_requests} completed ({self.failed} failed) "
            f"in {self.duration_s:.1f} s",
            f"  throughput: {self.request_throughput:.2f} req/s, {self.output_throughput:.1f} output tok/s",
            f"  tokens: {self.input_tokens} prompt ({self.cached_input_tokens} from the prefix cache), "
            f"{self.output_tokens} output",
        ]
        for name, s in (("TTFT", self.ttft_s), ("TPOT", self.tpot_s), ("ITL", self.itl_s), ("E2E", self.e2e_s)):
            lines.append(
                f"  {name:4} ms: mean {s.mean * 1e3:8.1f}  p50 {s.p50 * 1e3:8.1f}  "
                f"p90 {s.p90 * 1e3:8.1f}  p99 {s.p99 * 1e3:8.1f}"
            )
        return "\n".join(lines)


def _pct(ordered: list[float], q: float) -> float:
    """Linear-interpolated percentile of sorted values."""
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def load_dataset(path: Path) -> list[WorkItem | dict[str, Any]]:
    """A JSON list of {"prompt": text or token ids, "max_tokens": int}."""
    entries = json.loads(path.read_text())
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty JSON list of {{'prompt', 'max_tokens'}} objects")
    return entries


async def run_serve_bench(config: ServeBenchConfig, items: list[WorkItem | dict[str, Any]]) -> ServeBenchResult:
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(
        base_url=config.base_url, headers=headers, timeout=config.timeout_s, limits=limits
    ) as client:
        model = config.model or await _first_model(client)
        delays = _arrival_offsets(len(items), config.request_rate, config.arrival_seed)
        start = time.perf_counter()
        tasks = [
            asyncio.ensure_future(_delayed(start + delay, _one_request(client, model, item, config)))
            for delay, item in zip(delays, items, strict=True)
        ]
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return _summarise(config.request_rate, records, duration)


async def _first_model(client: httpx.AsyncClient) -> str:
    response = await client.get("/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def _arrival_offsets(count: int, rate: float, seed: int) -> list[float]:
    """Poisson process: exponential gaps with mean 1/rate (all zero for an infinite rate)."""
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(seed)
    offsets, now = [], 0.0
    for _ in range(count):
        offsets.append(now)
        now += rng.expovariate(rate)
    return offsets


async def _delayed(at: float, work: Any) -> RequestRecord:
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    return await work


def _request_body(model: str, item: WorkItem | dict[str, Any], config: ServeBenchConfig) -> dict[str, Any]:
    if isinstance(item, WorkItem):
        prompt: Any = item.prompt_token_ids
        max_tokens = item.output_len
    else:
        prompt, max_tokens = item["prompt"], int(item["max_tokens"])
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.banned_token_ids:
        body["logit_bias"] = {str(token): -100.0 for token in config.banned_token_ids}
    return body


async def _one_request(
    client: httpx.AsyncClient, model: str, item: WorkItem | dict[str, Any], config: ServeBenchConfig
) -> RequestRecord:
    body = _request_body(model, item, config)
    prompt = body["prompt"]
    record = RequestRecord(ok=False, prompt_tokens=len(prompt) if isinstance(prompt, list) else 0)
    sent = time.perf_counter()
    last: float | None = None
    content_chunks = 0
    finish_reason: str | None = None
    usage_seen = False
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    record.error = chunk["error"].get("message", "error")
                    return record
                now = time.perf_counter()
                if chunk.get("usage"):
                    usage_seen = True
                    record.output_tokens = chunk["usage"]["completion_tokens"]
                    record.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    details = chunk["usage"].get("prompt_tokens_details") or {}
                    record.cached_prompt_tokens = details.get("cached_tokens") or 0
                choices = chunk.get("choices", [])
                finish_reason = next((c["finish_reason"] for c in choices if c.get("finish_reason")), finish_reason)
                if any(choice.get("text") for choice in choices):
                    content_chunks += 1
                    if last is None:
                        record.ttft = now - sent
                    else:
                        record.itls.append(now - last)
                    last = now
        if not usage_seen:
            # No usage in the stream (llama.cpp's server): a request that ended
            # on its length limit produced exactly max_tokens tokens; otherwise
            # count content chunks (one token each on the servers we know).
            record.output_tokens = body["max_tokens"] if finish_reason == "length" else content_chunks
        record.e2e = time.perf_counter() - sent
        record.ok = last is not None
        if not record.ok:
            record.error = "no content received"
    except httpx.HTTPError as error:
        record.error = f"{type(error).__name__}: {error}"
    return record


def _summarise(rate: float, records: list[RequestRecord], duration: float) -> ServeBenchResult:
    done = [r for r in records if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    return ServeBenchResult(
        request_rate=rate,
        num_requests=len(records),
        completed=len(done),
        failed=len(records) - len(done),
        duration_s=duration,
        input_tokens=sum(r.prompt_tokens for r in done),
        cached_input_tokens=sum(r.cached_prompt_tokens for r in done),
        output_tokens=output_tokens,
        request_throughput=len(done) / duration,
        output_throughput=output_tokens / duration,
        ttft_s=Summary.of([r.ttft for r in done]),
        tpot_s=Summary.of([t for r in done if (t := r.tpot) is not None]),
        itl_s=Summary.of([gap for r in done for gap in r.itls]),
        e2e_s=Summary.of([r.e2e for r in done]),
        errors=sorted({r.error for r in records if r.error})[:10],
    )
