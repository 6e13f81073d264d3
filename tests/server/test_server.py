"""The OpenAI-compatible server, as a real process, against the official client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch

from hawker import LLM, SamplingParams
from hawker.bench.serve import ServeBenchConfig, run_serve_bench
from hawker.bench.workload import WorkItem
from tests.support.server_process import API_KEY, ServerProcess, launch, wait_ready
from tests.support.tiny_models import VOCAB_SIZE, build_tiny_checkpoint

# The main server fails any request whose prompt holds this token (a test hook);
# the aux server's engine loop dies on it. "</s>" never comes out of tokenizing text.
FAULT_TOKEN = 2
MAX_POSITIONS = 4096


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    return build_tiny_checkpoint("llama", tmp_path_factory.mktemp("server") / "llama", max_positions=MAX_POSITIONS)


@pytest.fixture(scope="module")
def servers(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    logs = tmp_path_factory.mktemp("server-logs")
    started = {
        "main": launch(
            checkpoint,
            logs / "main.log",
            "--max-request-body-mb",
            "0.05",
            "--inject-fault-token-id",
            str(FAULT_TOKEN),
        ),
        "aux": launch(
            checkpoint,
            logs / "aux.log",
            "--api-key",
            API_KEY,
            "--max-num-seqs",
            "1",
            "--max-waiting-requests",
            "1",
            "--inject-fatal-token-id",
            str(FAULT_TOKEN),
        ),
        "drain": launch(checkpoint, logs / "drain.log", "--shutdown-grace-s", "1"),
    }
    try:
        for server in started.values():
            wait_ready(server)
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def main(servers: dict[str, ServerProcess]) -> ServerProcess:
    return servers["main"]


@pytest.fixture(scope="module")
def offline(checkpoint: Path) -> LLM:
    return LLM(str(checkpoint), dtype="float32", block_size=4, kv_cache_memory_gb=0.05)


def _model(server: ServerProcess) -> str:
    return httpx.get(f"{server.base_url}/v1/models", timeout=10).json()["data"][0]["id"]


def _prompt_ids(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(3, VOCAB_SIZE) for _ in range(length)]


def _assert_idle(server: ServerProcess, within: float = 5.0) -> float:
    """The engine holds nothing: no running or waiting request, no KV block in use."""
    start = time.monotonic()
    while True:
        m = server.metrics()
        idle = (
            m["hawker:num_requests_running"] == 0
            and m["hawker:num_requests_waiting"] == 0
            and m["hawker:kv_cache_usage_perc"] == 0
        )
        elapsed = time.monotonic() - start
        if idle:
            return elapsed
        assert elapsed < within, f"engine not idle after {within} s: {m}"
        time.sleep(0.02)


def _assert_healthy(server: ServerProcess) -> None:
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
    _assert_idle(server)


def _assert_error_shape(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


# ------------------------------------------------------------------ parity
def test_openai_sync_client_matches_offline(main: ServerProcess, offline: LLM) -> None:
    client = openai.OpenAI(base_url=f"{main.base_url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    prompt = "The quick brown fox"
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    expected = offline.generate(prompt, greedy, use_tqdm=False)[0].outputs[0]

    whole = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0)
    assert whole.choices[0].text == expected.text
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 24
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris is the capital of"}]
    expected_chat = offline.chat(messages, greedy, use_tqdm=False)[0].outputs[0].text
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
    assert chat.choices[0].message.content == expected_chat
    assert chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chat_chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices) == expected_chat
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert chat_chunks[-1].usage is not None and chat_chunks[-1].usage.completion_tokens == 24


def test_openai_async_client_matches_offline(main: ServerProcess, offline: LLM) -> None:
    prompts = ["Hawker serves language models", "0123456789 abc"]
    expected = [o.outputs[0].text for o in offline.generate(prompts, SamplingParams(temperature=0, max_tokens=16))]

    async def run() -> tuple[list[str], list[str], str]:
        client = openai.AsyncOpenAI(base_url=f"{main.base_url}/v1", api_key="unused")
        model = (await client.models.list()).data[0].id
        # One request with a list of prompts: one choice per prompt, in order.
        whole = await client.completions.create(model=model, prompt=prompts, max_tokens=16, temperature=0)
        texts = [c.text for c in sorted(whole.choices, key=lambda c: c.index)]
        streamed = ["", ""]
        stream = await client.completions.create(model=model, prompt=prompts, max_tokens=16, temperature=0, stream=True)
        async for chunk in stream:
            for choice in chunk.choices:
                streamed[choice.index] += choice.text
        chat = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompts[0]}], max_tokens=16, temperature=0
        )
        await client.close()
        return texts, streamed, chat.choices[0].message.content or ""

    texts, streamed, chat_text = asyncio.run(run())
    assert texts == expected
    assert streamed == expected
    expected_chat = offline.chat(
        [{"role": "user", "content": prompts[0]}], SamplingParams(temperature=0, max_tokens=16)
    )
    assert chat_text == expected_chat[0].outputs[0].text


def test_64_concurrent_seeded_streams_match_offline(main: ServerProcess, offline: LLM) -> None:
    rng = random.Random(5)
    prompts = [_prompt_ids(rng, rng.randint(4, 60)) for _ in range(64)]
    params = [
        SamplingParams(temperature=1.0, top_p=0.95, seed=1000 + i, max_tokens=rng.randint(8, 24)) for i in range(64)
    ]
    expected = [o.outputs[0].text for o in offline.generate(prompts, params, use_tqdm=False)]

    async def one(client: openai.AsyncOpenAI, model: str, i: int) -> str:
        stream = await client.completions.create(
            model=model,
            prompt=prompts[i],
            max_tokens=params[i].max_tokens,
            temperature=1.0,
            top_p=0.95,
            seed=params[i].seed,
            stream=True,
        )
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{main.base_url}/v1", api_key="unused", max_retries=0)
        model = (await client.models.list()).data[0].id
        texts = await asyncio.gather(*(one(client, model, i) for i in range(64)))
        await client.close()
        return list(texts)

    got = asyncio.run(run())
    assert got == expected
    assert len(set(got)) > 32  # different seeds really gave different samples
    _assert_healthy(main)


def test_logprobs_and_echo(main: ServerProcess, offline: LLM) -> None:
    ids = [5, 17, 42, 99, 7]
    expected = offline.generate([ids], SamplingParams(temperature=0, max_tokens=4, logprobs=3), use_tqdm=False)[0]
    body = {"prompt": ids, "max_tokens": 4, "temperature": 0, "logprobs": 3, "echo": True}
    response = httpx.post(f"{main.base_url}/v1/completions", json=body, timeout=30)
    choice = response.json()["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) + 4
    assert logprobs["token_logprobs"][0] is None  # the first prompt token has no context
    got = logprobs["token_logprobs"][len(ids) :]
    want = [
        entry[token].logprob
        for token, entry in zip(expected.outputs[0].token_ids, expected.outputs[0].logprobs, strict=True)
    ]
    assert got == pytest.approx(want, abs=1e-4)
    assert all(len(top) >= 3 for top in logprobs["top_logprobs"][1:])

    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logprobs": True, "top_logprobs": 2}
    content = httpx.post(f"{main.base_url}/v1/chat/completions", json=chat, timeout=30).json()["choices"][0]
    entries = content["logprobs"]["content"]
    assert len(entries) == 3 and all(len(e["top_logprobs"]) == 2 for e in entries)
    for entry in entries:
        assert entry["logprob"] <= 0
        raw = bytes(entry["bytes"])
        # A token holding part of a UTF-8 character is shown by its bytes, as OpenAI does.
        shown = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        assert entry["token"] in {raw.decode("utf-8", errors="replace"), shown}


# ------------------------------------------------------------------ errors
TOO_LONG = list(range(3, 3 + 10)) * 500  # 5000 tokens > 4096


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "words"),
    [
        ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature", [">= 0"]),
        ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p", ["(0, 1]"]),
        ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n", [">= 1"]),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", [">= 1"]),
        ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", []),
        ("/v1/completions", {"prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias", []),
        ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 500}}, 400, "logit_bias", ["[-100, 100]"]),
        ("/v1/completions", {"prompt": ""}, 400, None, ["empty"]),
        ("/v1/completions", {"prompt": []}, 400, "prompt", ["empty"]),
        ("/v1/completions", {"prompt": [5, 100000]}, 400, None, ["100000", "vocabulary"]),
        ("/v1/completions", {"prompt": TOO_LONG}, 400, None, ["5000", "4096"]),
        ("/v1/completions", {"prompt": TOO_LONG[:4000], "max_tokens": 200}, 400, None, ["4000", "200", "4096"]),
        ("/v1/completions", {}, 400, "prompt", []),
        ("/v1/completions", {"prompt": "hi", "model": "gpt-9"}, 404, "model", ["gpt-9"]),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages", []),
        ("/v1/chat/completions", {"messages": []}, 400, "messages", []),
        ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages", []),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages", []),
        ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", []),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
            400,
            None,
            ["logprobs"],
        ),
        ("/v1/nothing", {}, 404, None, []),
    ],
)
def test_errors_have_openai_shape_and_change_nothing(
    main: ServerProcess, path: str, body: dict, status: int, param: str | None, words: list[str]
) -> None:
    response = httpx.post(f"{main.base_url}{path}", json=body, timeout=30)
    error = _assert_error_shape(response, status)
    if param is not None:
        assert error["param"] == param
    for word in words:
        assert word in error["message"]
    _assert_healthy(main)


def test_malformed_json_and_large_body(main: ServerProcess) -> None:
    headers = {"content-type": "application/json"}
    bad = httpx.post(f"{main.base_url}/v1/completions", content=b'{"prompt": ', headers=headers, timeout=30)
    assert _assert_error_shape(bad, 400)["code"] == "invalid_json"
    big = json.dumps({"prompt": "x" * 100_000}).encode()
    assert _assert_error_shape(httpx.post(f"{main.base_url}/v1/completions", content=big, headers=headers), 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield big[:40_000]
        yield big[40_000:]

    chunked = httpx.post(f"{main.base_url}/v1/completions", content=chunks(), headers=headers, timeout=30)
    _assert_error_shape(chunked, 413)
    _assert_healthy(main)


def test_api_key_and_full_queue(servers: dict[str, ServerProcess]) -> None:
    aux = servers["aux"]
    url = aux.base_url
    _assert_error_shape(httpx.get(f"{url}/v1/models"), 401)
    _assert_error_shape(httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(f"{url}/v1/models", headers=auth).status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200  # probes stay open
    assert httpx.get(f"{url}/metrics").status_code == 200

    # One sequence may run and one may wait: a third concurrent request is refused.
    async def run() -> httpx.Response:
        async with httpx.AsyncClient(base_url=url, headers=auth, timeout=60) as client:
            long = {"prompt": [5, 6, 7], "max_tokens": 3000, "ignore_eos": True}
            running = asyncio.ensure_future(client.post("/v1/completions", json=long))
            await asyncio.sleep(1.0)
            waiting = asyncio.ensure_future(client.post("/v1/completions", json=long))
            await asyncio.sleep(1.0)
            refused = await client.post("/v1/completions", json={"prompt": [5], "max_tokens": 2})
            for task in (running, waiting):  # leaving aborts them
                task.cancel()
            await asyncio.gather(running, waiting, return_exceptions=True)
            return refused

    refused = asyncio.run(run())
    error = _assert_error_shape(refused, 429)
    assert error["code"] == "queue_full" and refused.headers["Retry-After"] == "1"
    _assert_healthy(aux)


def test_injected_fault_fails_only_its_request(main: ServerProcess, offline: LLM) -> None:
    rng = random.Random(9)
    good = [_prompt_ids(rng, 20) for _ in range(4)]
    greedy = SamplingParams(temperature=0, max_tokens=32)
    expected = [o.outputs[0].text for o in offline.generate(good, greedy, use_tqdm=False)]
    before = main.metrics()["hawker:request_failures_total"]

    async def run() -> tuple[list[str], BaseException]:
        client = openai.AsyncOpenAI(base_url=f"{main.base_url}/v1", api_key="unused", max_retries=0)
        model = (await client.models.list()).data[0].id

        async def text(prompt: list[int]) -> str:
            out = await client.completions.create(model=model, prompt=prompt, max_tokens=32, temperature=0)
            return out.choices[0].text

        bad = [*_prompt_ids(rng, 10), FAULT_TOKEN, *_prompt_ids(rng, 10)]
        results = await asyncio.gather(*(text(p) for p in [*good[:2], bad, *good[2:]]), return_exceptions=True)
        await client.close()
        return [r for i, r in enumerate(results) if i != 2], results[2]  # type: ignore[return-value]

    texts, failure = asyncio.run(run())
    assert texts == expected
    assert isinstance(failure, openai.InternalServerError)
    assert failure.status_code == 500
    assert "cmpl-" in str(failure) and "injected fault" in str(failure)
    assert main.metrics()["hawker:request_failures_total"] == before + 1
    _assert_healthy(main)


# ------------------------------------------------------ disconnects, metrics
def test_disconnected_stream_is_aborted_within_a_second(main: ServerProcess) -> None:
    aborted_before = main.metrics().get("hawker:request_finished_total{finished_reason=abort}", 0.0)
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{main.base_url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        received = [line for line, _ in zip(lines, range(6), strict=False) if line.startswith("data: ")]
        assert received
        m = main.metrics()
        assert m["hawker:num_requests_running"] == 1 and m["hawker:kv_cache_usage_perc"] > 0
    assert _assert_idle(main, within=1.0) < 1.0
    assert main.metrics()["hawker:request_finished_total{finished_reason=abort}"] == aborted_before + 1


def test_disconnected_plain_request_is_aborted(main: ServerProcess) -> None:
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 4000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{main.base_url}/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.5))
    assert _assert_idle(main, within=1.0) < 1.0


def test_metrics_parse_and_move(main: ServerProcess) -> None:
    before = main.metrics()
    body = {"prompt": [5, 6, 7, 8, 9, 10, 11], "max_tokens": 12, "ignore_eos": True}
    assert httpx.post(f"{main.base_url}/v1/completions", json=body, timeout=30).status_code == 200
    after = main.metrics()
    assert after["hawker:generation_tokens_total"] == before["hawker:generation_tokens_total"] + 12
    assert after["hawker:prompt_tokens_total"] > before["hawker:prompt_tokens_total"]
    assert after["hawker:prefix_cache_queries_total"] >= before["hawker:prefix_cache_queries_total"] + 7
    for histogram in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        name = f"hawker:{histogram}_seconds_count"
        assert after[name] == before[name] + 1
    assert after["hawker:inter_token_latency_seconds_count"] >= before["hawker:inter_token_latency_seconds_count"] + 11
    assert after["hawker:engine_steps_total"] > before["hawker:engine_steps_total"]
    length = "hawker:request_finished_total{finished_reason=length}"
    assert after[length] == before.get(length, 0.0) + 1
    # The same prompt again hits the prefix cache.
    httpx.post(f"{main.base_url}/v1/completions", json=body, timeout=30)
    again = main.metrics()
    assert again["hawker:prefix_cache_hits_total"] > after["hawker:prefix_cache_hits_total"]


def test_tokenize_detokenize_models_openapi(main: ServerProcess, offline: LLM) -> None:
    url = main.base_url
    tokens = httpx.post(f"{url}/tokenize", json={"prompt": "The quick brown fox"}).json()
    assert tokens["tokens"] == offline.get_tokenizer()("The quick brown fox").input_ids
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == MAX_POSITIONS
    text = httpx.post(f"{url}/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text == "The quick brown fox"
    _assert_error_shape(httpx.post(f"{url}/detokenize", json={"tokens": [10**6]}), 400)
    models = httpx.get(f"{url}/v1/models").json()
    assert models["data"][0]["id"] == "llama" and models["data"][0]["max_model_len"] == MAX_POSITIONS
    assert abs(models["data"][0]["created"] - time.time()) < 3600  # a unix time, as OpenAI's cards have
    paths = httpx.get(f"{url}/openapi.json").json()["paths"]
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize"):
        assert path in paths


def test_bench_serve_measures_a_live_server(main: ServerProcess) -> None:
    rng = random.Random(77)
    items: list = [WorkItem(_prompt_ids(rng, 40), 6) for _ in range(5)]
    config = ServeBenchConfig(main.base_url, None, request_rate=20.0, arrival_seed=1)
    cold = asyncio.run(run_serve_bench(config, items))
    assert (cold.completed, cold.failed) == (5, 0)
    assert cold.output_tokens == 30 and cold.input_tokens == 200
    assert cold.cached_input_tokens == 0
    assert 0 < cold.ttft_s.p50 <= cold.e2e_s.p50 and cold.tpot_s.mean > 0
    # The same prompts again: the server's prefix cache serves their full blocks, and the report says so.
    warm = asyncio.run(run_serve_bench(config, items))
    # The servers use 4-token blocks: 10 full blocks per 40-token prompt, of which the last is
    # recomputed because a step needs at least one prompt token to produce logits from.
    assert warm.cached_input_tokens == 5 * 36
    assert "180 from the prefix cache" in warm.report()
    _assert_healthy(main)


# ------------------------------------------------------------ end of life
def test_sigterm_drains_and_exits_zero(servers: dict[str, ServerProcess]) -> None:
    drain = servers["drain"]
    bodies = [{"prompt": [5, 6, 7, 8 + i], "max_tokens": 4000, "ignore_eos": True, "stream": True} for i in range(3)]
    bodies += [{"prompt": [9, 10, 11 + i], "max_tokens": 8, "ignore_eos": True, "stream": True} for i in range(2)]
    results: list[list[dict] | None] = [None] * len(bodies)
    first_chunk = [threading.Event() for _ in bodies]

    def client(i: int) -> None:
        chunks: list[dict] = []
        with httpx.stream("POST", f"{drain.base_url}/v1/completions", json=bodies[i], timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    first_chunk[i].set()
                    chunks.append({"done": True} if line == "data: [DONE]" else json.loads(line[6:]))
        first_chunk[i].set()
        results[i] = chunks

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for event in first_chunk:
        assert event.wait(30)
    drain.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(60)
    assert drain.process.wait(60) == 0, drain.log()
    for i, chunks in enumerate(results):
        assert chunks is not None and chunks[-1] == {"done": True}, f"client {i} got no clean end: {chunks}"
        reason = chunks[-2]["choices"][0]["finish_reason"]
        if bodies[i]["max_tokens"] == 8:
            assert reason == "length"
        else:
            assert reason == "abort"  # still running after the 1 s grace period


def test_engine_death_turns_health_to_503(servers: dict[str, ServerProcess]) -> None:
    aux = servers["aux"]
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body = {"prompt": [5, FAULT_TOKEN, 6], "max_tokens": 4}
    dead = httpx.post(f"{aux.base_url}/v1/completions", json=body, headers=auth, timeout=30)
    assert _assert_error_shape(dead, 503)["code"] == "engine_dead"
    assert _assert_error_shape(httpx.get(f"{aux.base_url}/health", timeout=5), 503)
    start = time.monotonic()
    again = httpx.post(f"{aux.base_url}/v1/completions", json={"prompt": [5], "max_tokens": 2}, headers=auth, timeout=5)
    assert _assert_error_shape(again, 503) and time.monotonic() - start < 2.0
    assert aux.metrics()["hawker:engine_healthy"] == 0
