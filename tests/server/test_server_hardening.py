"""Issue 18 against real servers: crashes answered in OpenAI's shape, one Authorization header,
weight updates confined to their directory, and a SIGTERM exit bounded by the grace period."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from hawker import LLM, SamplingParams
from hawker.options import EngineOptions
from hawker.server.app import ServerSettings, build_app
from hawker.server.responders import CompletionResponder
from hawker.server.serve import ServeOptions, build_router
from tests.support.server_process import API_KEY, ServerProcess, launch, serve_in_process, wait_ready
from tests.support.tiny_models import build_tiny_checkpoint
from tests.support.weights import perturbed_weights

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = [5, 17, 42, 99, 3, 250, 7, 11]
GRACE_S = 2.0
# How far past the grace period the process may take to be reaped here (the server's own
# bound is the grace period; this covers the test's polling and a loaded machine).
EXIT_SLACK_S = 0.5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(11)
    return build_tiny_checkpoint("llama", tmp_path_factory.mktemp("hardening") / "llama", max_positions=4096)


@pytest.fixture(scope="module")
def weight_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("weight-root")


@pytest.fixture(scope="module")
def server(checkpoint: Path, weight_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("hardening-log") / "server.log"
    process = launch(checkpoint, log, "--api-key", API_KEY, "--allowed-weight-roots", str(weight_root))
    try:
        yield wait_ready(process)
    finally:
        process.stop()


def _post(server: ServerProcess, path: str, body: object) -> httpx.Response:
    """POST ``body`` as JSON with every non-ASCII character escaped (so lone surrogates can be sent)."""
    headers = {**AUTH, "content-type": "application/json"}
    return httpx.post(f"{server.base_url}{path}", content=json.dumps(body).encode(), headers=headers, timeout=60)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert response.headers["x-request-id"].startswith("req-")
    return body["error"]


def _events(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]


def _complete(server: ServerProcess) -> str:
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    return _post(server, "/v1/completions", body).json()["choices"][0]["text"]


# ---------------------------------------------------------------- crashes
@pytest.mark.parametrize("prompt", [[5], "a", [[5], [6, 7]], ["b", "c"]])
@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_logprobs_on_one_token_prompts(server: ServerProcess, prompt: object, stream: bool) -> None:
    body = {"prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 2, "n": 2, "stream": stream}
    response = _post(server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    if stream:
        events = _events(response)
        assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1])
        first = json.loads(events[0])["choices"][0]["logprobs"]
    else:
        first = response.json()["choices"][0]["logprobs"]
    assert first["token_logprobs"][0] is None  # the first prompt token has no context
    assert len(first["tokens"]) == len(first["token_logprobs"]) == len(first["top_logprobs"])


def test_a_one_token_prompt_has_its_first_prompt_logprob_entry(checkpoint: Path) -> None:
    """The root of the echo crash: the first prompt token's None entry was only added with the next one's."""
    llm = LLM(str(checkpoint), dtype="float32", kv_cache_memory_gb=0.02)
    (output,) = llm.generate([[5]], SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)
    assert output.prompt_logprobs == [None]
    (output,) = llm.generate([[5, 6]], SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)
    assert output.prompt_logprobs is not None and output.prompt_logprobs[0] is None and 6 in output.prompt_logprobs[1]


LONE = "\ud800"
BAD_TEXT = [
    ("/v1/completions", {"prompt": f"hi {LONE}"}, "prompt"),
    ("/v1/completions", {"prompt": ["fine", f"{LONE}x"]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop": ["\udfff"]}, "stop"),
    ("/v1/completions", {"prompt": "hi", "stream": True, "user": LONE}, "user"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONE}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": LONE}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True, "model": LONE}, "model"),
    ("/tokenize", {"prompt": LONE}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": LONE}]}, "messages"),
    ("/detokenize", {"tokens": [5], "model": LONE}, "model"),
    ("/admin/update_weights", {"path": f"/tmp/{LONE}"}, "path"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD_TEXT)
def test_text_that_is_not_unicode_is_a_400(server: ServerProcess, path: str, body: dict, param: str) -> None:
    error = _error(_post(server, path, body), 400)
    assert error["param"] == param and error["code"] == "invalid_text"
    assert "surrogate" in error["message"]


def test_valid_surrogate_pairs_and_odd_text_are_served(server: ServerProcess) -> None:
    for text in ["\U0001f600 smile", "\x00", "\ufffe\uffff", "</s><s>", "e\u0301"]:
        response = _post(server, "/v1/completions", {"prompt": text, "max_tokens": 2, "echo": True, "logprobs": 1})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"].startswith(text)


@pytest.mark.parametrize(
    "raw", ['{"prompt": "\xed\xa0\x80"}'.encode("latin-1"), '{"prompt": "\ud800"}'.encode("utf-16", "surrogatepass")]
)
def test_surrogates_in_raw_bytes_are_a_400(server: ServerProcess, raw: bytes) -> None:
    headers = {**AUTH, "content-type": "application/json"}
    response = httpx.post(f"{server.base_url}/v1/completions", content=raw, headers=headers, timeout=30)
    assert _error(response, 400)["code"] == "invalid_text"


def _strict_json(text: str) -> object:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


FILTERS = [{"top_k": 1}, {"top_p": 0.01}, {"min_p": 0.99}]


@pytest.mark.parametrize("sampling", FILTERS)
@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_of_filtered_out_tokens_are_valid_json(server: ServerProcess, sampling: dict, stream: bool) -> None:
    """Tokens the sampling filters rule out have logprob -inf: reported as -9999.0 (as vLLM does)."""
    completion = {"prompt": "hi", "max_tokens": 3, "logprobs": 5, "echo": True, "stream": stream, **sampling}
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logprobs": True, "top_logprobs": 5}
    for path, body in [
        ("/v1/completions", completion),
        ("/v1/chat/completions", {**chat, **sampling, "stream": stream}),
    ]:
        response = _post(server, path, body)
        assert response.status_code == 200, response.text
        bodies = [_strict_json(e) for e in _events(response)[:-1]] if stream else [_strict_json(response.text)]
        assert "-9999.0" in response.text and "error" not in bodies[-1]


# ---------------------------------------------------------------- auth
@pytest.mark.parametrize(
    "values",
    [
        [f"Bearer {API_KEY}", f"Bearer {API_KEY}"],
        ["Bearer wrong", f"Bearer {API_KEY}"],  # a proxy checking the first would pass the last
        [f"Bearer {API_KEY}", "Bearer wrong"],
        [f"Bearer {API_KEY}", ""],
    ],
)
def test_several_authorization_headers_are_refused(server: ServerProcess, values: list[str]) -> None:
    headers = [("Authorization", value) for value in values]
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/admin/resume")]:
        response = httpx.request(method, f"{server.base_url}{path}", headers=headers, json={"prompt": "hi"})
        assert _error(response, 401)["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "Bearer",
        f"Bearer {API_KEY} {API_KEY}",
        f"Basic {API_KEY}",
        f"Bearer {API_KEY}x",
        f"Bearer {API_KEY[:-1]}",
        f"{API_KEY}",
    ],
)
def test_wrong_keys_are_refused(server: ServerProcess, value: str) -> None:
    _error(httpx.get(f"{server.base_url}/v1/models", headers={"Authorization": value}), 401)


def test_one_good_header_passes_and_probes_stay_open(server: ServerProcess) -> None:
    for value in [f"Bearer {API_KEY}", f"bearer {API_KEY}", f"BEARER  {API_KEY}"]:
        assert httpx.get(f"{server.base_url}/v1/models", headers={"Authorization": value}).status_code == 200
    for path in ("/health", "/metrics", "/v1/stats"):
        response = httpx.get(f"{server.base_url}{path}")
        assert response.status_code == 200 and response.headers["x-request-id"].startswith("req-")


# ---------------------------------------------------------------- weight updates
def _corrupt_header(directory: Path) -> None:
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")


def _integer_dtype(directory: Path) -> None:
    raw = json.dumps({"model.norm.weight": {"dtype": "I32", "shape": [64], "data_offsets": [0, 256]}}).encode()
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(256))


def _truncated(directory: Path) -> None:
    file = directory / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])


def _index_outside(directory: Path) -> None:
    index = {"weight_map": {"model.norm.weight": "../../../outside/model.safetensors"}}  # the root's sibling
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def _symlink_outside(directory: Path) -> None:
    target = directory.parent.parent.parent / "outside" / "model.safetensors"  # the root's sibling
    (directory / "model.safetensors").unlink()
    (directory / "model.safetensors").symlink_to(target)


def _wrong_shape(directory: Path) -> None:
    raw = json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}).encode()
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(12))


def _unknown_name(directory: Path) -> None:
    raw = json.dumps({"model.nothing.weight": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}).encode()
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(12))


BROKEN_UPDATES = {
    "corrupt header": _corrupt_header,
    "integer dtype": _integer_dtype,
    "truncated": _truncated,
    "index leads outside": _index_outside,
    "symlink leads outside": _symlink_outside,
    "wrong shape": _wrong_shape,
    "unknown name": _unknown_name,
}


@pytest.fixture(scope="module")
def trained(checkpoint: Path, weight_root: Path) -> Path:
    """A good update under the allowed root, and (next to the root) the same outside it."""
    perturbed_weights(checkpoint, weight_root / "trained")
    shutil.copytree(weight_root / "trained", weight_root.parent / "outside")
    return weight_root / "trained"


@pytest.mark.parametrize("kind", sorted(BROKEN_UPDATES))
def test_a_bad_update_is_a_400_that_changes_nothing(
    server: ServerProcess, trained: Path, weight_root: Path, kind: str
) -> None:
    before = _complete(server)
    directory = weight_root / "broken" / kind.replace(" ", "-")
    shutil.copytree(trained, directory)
    BROKEN_UPDATES[kind](directory)
    error = _error(_post(server, "/admin/update_weights", {"path": str(directory)}), 400)
    assert error["param"] == "path"
    assert _complete(server) == before


def test_updates_load_only_under_the_allowed_roots(server: ServerProcess, trained: Path, weight_root: Path) -> None:
    before = _complete(server)
    outside = weight_root.parent / "outside"
    assert (
        "outside the allowed" in _error(_post(server, "/admin/update_weights", {"path": str(outside)}), 400)["message"]
    )
    (weight_root / "link-out").symlink_to(outside)  # a symlink under the root, leading out of it
    _error(_post(server, "/admin/update_weights", {"path": str(weight_root / "link-out")}), 400)
    _error(_post(server, "/admin/update_weights", {"path": f"{weight_root}/../outside"}), 400)
    _error(_post(server, "/admin/update_weights", {"path": ""}), 400)
    assert _complete(server) == before
    response = _post(server, "/admin/update_weights", {"path": str(trained)})
    assert response.status_code == 200 and response.json()["weight_version"] >= 1
    assert _complete(server) != before


# ---------------------------------------------------------------- the catch-all, on every route
@pytest.fixture(scope="module")
def in_process(checkpoint: Path) -> Iterator[tuple[str, object]]:
    engine = EngineOptions(model=str(checkpoint), dtype="float32", kv_cache_memory_gb=0.02)
    app = build_app(
        build_router(ServeOptions(engine=engine)), ServerSettings(served_model_name="tiny", api_key=API_KEY)
    )
    with serve_in_process(app) as base_url:
        yield base_url, app


def test_an_unexpected_error_on_any_route_is_a_500_in_openai_shape(
    in_process: tuple[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url, app = in_process
    routes = [route for route in app.routes if getattr(route, "methods", None)]  # type: ignore[attr-defined]

    async def broken(scope: dict, receive: object, send: object) -> None:
        raise RuntimeError("a bug")

    for route in routes:
        monkeypatch.setattr(route, "app", broken)
    checked = set()
    for route in routes:
        method = sorted(route.methods - {"HEAD"})[0]
        response = httpx.request(method, f"{base_url}{route.path}", headers=AUTH, json={}, timeout=30)
        error = _error(response, 500)
        assert error["code"] == "internal_error" and "a bug" not in error["message"]
        assert response.headers["x-request-id"] in error["message"]
        checked.add(route.path)
    assert {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/v1/stats"} <= checked
    assert {"/admin/update_weights", "/health", "/metrics", "/v1/models"} <= checked


def test_a_failure_while_formatting_is_a_500_or_an_error_event(
    in_process: tuple[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url, _ = in_process
    calls = {"n": 0}
    real_chunks = CompletionResponder.chunks

    def failing_chunks(self: CompletionResponder, *args: object) -> list:
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyError(1234)
        return real_chunks(self, *args)  # type: ignore[arg-type]

    def failing_full(self: CompletionResponder, finals: object) -> dict:
        raise KeyError(1234)

    monkeypatch.setattr(CompletionResponder, "chunks", failing_chunks)
    monkeypatch.setattr(CompletionResponder, "full", failing_full)
    body = {"prompt": PROMPT, "max_tokens": 8, "ignore_eos": True}
    _error(httpx.post(f"{base_url}/v1/completions", json=body, headers=AUTH, timeout=30), 500)
    streamed = httpx.post(f"{base_url}/v1/completions", json={**body, "stream": True}, headers=AUTH, timeout=30)
    assert streamed.status_code == 200
    events = _events(streamed)
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])["error"]
    assert last["code"] == "internal_error" and streamed.headers["x-request-id"] in last["message"]
    assert len(events) <= 4  # at most two chunks, then the error event and [DONE]


# ---------------------------------------------------------------- drain
@dataclass
class InFlight:
    """A streamed and a whole request decoding on ``base_url``; each records when and how it ended."""

    base_url: str
    started: threading.Event = field(default_factory=threading.Event)
    ends: dict[str, tuple[float, Any]] = field(default_factory=dict)

    def start(self) -> list[threading.Thread]:
        clients = [threading.Thread(target=self._stream), threading.Thread(target=self._whole)]
        for client in clients:
            client.start()
        assert self.started.wait(30)
        return clients

    def _stream(self) -> None:
        body = {"prompt": [5, 6, 7], "max_tokens": 4000, "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream("POST", f"{self.base_url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.started.set()
                    events.append(line[6:])
        self.ends["stream"] = (time.monotonic(), events)

    def _whole(self) -> None:
        body = {"prompt": [8, 9], "max_tokens": 4000, "ignore_eos": True}
        response = httpx.post(f"{self.base_url}/v1/completions", json=body, timeout=60)
        self.ends["whole"] = (time.monotonic(), response.json())


def _stall(base_url: str) -> socket.socket:
    """A client that never finishes sending its body: uvicorn alone would wait for it forever."""
    stalled = socket.create_connection(("127.0.0.1", int(base_url.rsplit(":", 1)[1])))
    stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    return stalled


def test_sigterm_exit_is_bounded_by_the_grace_period(checkpoint: Path, tmp_path: Path) -> None:
    drain = wait_ready(launch(checkpoint, tmp_path / "drain.log", "--shutdown-grace-s", str(GRACE_S)))
    in_flight = InFlight(drain.base_url)
    stalled = _stall(drain.base_url)
    try:
        clients = in_flight.start()
        time.sleep(0.3)  # both requests are decoding
        sigterm = time.monotonic()
        drain.process.send_signal(signal.SIGTERM)
        code = drain.process.wait(30)
        exited = time.monotonic() - sigterm
        for client in clients:
            client.join(30)
    finally:
        stalled.close()
        drain.stop()
    assert code == 0, drain.log()
    assert exited <= GRACE_S + EXIT_SLACK_S, f"exit took {exited:.2f} s for a {GRACE_S} s grace period"
    stream_end, events = in_flight.ends["stream"]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"
    whole_end, body = in_flight.ends["whole"]
    assert body["choices"][0]["finish_reason"] == "abort"
    # The requests in flight had most of the grace period before they were aborted.
    assert min(stream_end, whole_end) - sigterm >= GRACE_S - 0.6
