"""`hawker bench serve` request building and token counting, against a scripted server."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from hawker.bench.serve import ServeBenchConfig, _one_request
from hawker.bench.workload import WorkItem


def _sse(chunks: list[dict]) -> bytes:
    lines = [f"data: {json.dumps(chunk)}\n\n" for chunk in chunks]
    return ("".join(lines) + "data: [DONE]\n\n").encode()


def _text_chunks(texts: list[str], finish_reason: str) -> list[dict]:
    chunks = [{"choices": [{"index": 0, "text": t, "finish_reason": None}]} for t in texts]
    chunks[-1]["choices"][0]["finish_reason"] = finish_reason
    return chunks


def _run(chunks: list[dict], config: ServeBenchConfig, item: WorkItem) -> tuple[object, dict]:
    seen: dict = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.update(json.loads(request.content))
        return httpx.Response(200, content=_sse(chunks), headers={"content-type": "text/event-stream"})

    async def go() -> object:
        async with httpx.AsyncClient(base_url="http://test", transport=httpx.MockTransport(handler)) as client:
            return await _one_request(client, "m", item, config)

    return asyncio.run(go()), seen


CONFIG = ServeBenchConfig("http://test", "m", request_rate=1.0)


def test_usage_chunk_is_the_token_count() -> None:
    chunks = _text_chunks(["a", "b"], "length")
    chunks.append({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 7}})
    record, body = _run(chunks, CONFIG, WorkItem([1, 2, 3], 9))
    assert record.ok and record.output_tokens == 7 and record.prompt_tokens == 3
    assert "logit_bias" not in body and body["max_tokens"] == 9


@pytest.mark.parametrize(("finish_reason", "expected"), [("length", 9), ("stop", 3)])
def test_without_usage_tokens_come_from_finish_reason_or_chunks(finish_reason: str, expected: int) -> None:
    record, _ = _run(_text_chunks(["a", "b", "c"], finish_reason), CONFIG, WorkItem([1, 2], 9))
    assert record.ok and record.output_tokens == expected
    assert len(record.itls) == 2


def test_banned_tokens_are_sent_as_logit_bias() -> None:
    config = ServeBenchConfig("http://test", "m", request_rate=1.0, banned_token_ids=(2, 5))
    _, body = _run(_text_chunks(["a"], "length"), config, WorkItem([1], 4))
    assert body["logit_bias"] == {"2": -100.0, "5": -100.0}
    assert body["ignore_eos"] is True
