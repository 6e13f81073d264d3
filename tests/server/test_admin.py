"""Admin HTTP routes for a trainer: pause, weight update from a path, resume, sleep / wake, over two replicas."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from hawker import LLM, SamplingParams
from hawker.options import EngineOptions
from hawker.server.app import ServerSettings, build_app
from hawker.server.serve import ServeOptions, build_router
from tests.support.server_process import serve_in_process
from tests.support.weights import perturbed_weights

KEY = "admin-key"
PROMPT = [5, 17, 42, 99, 3, 250, 7, 11]


@pytest.fixture(scope="module")
def server(tiny_checkpoints: dict[str, Path]) -> Iterator[str]:
    engine = EngineOptions(model=str(tiny_checkpoints["llama"]), dtype="float32", kv_cache_memory_gb=0.02)
    router = build_router(ServeOptions(engine=engine, data_parallel_size=2))
    with serve_in_process(build_app(router, ServerSettings(served_model_name="tiny", api_key=KEY))) as base_url:
        yield base_url


def _post(base: str, path: str, body: dict | None = None, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{base}{path}", json=body or {}, headers=headers, timeout=60)


def _complete(base: str) -> str:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    return _post(base, "/v1/completions", body).json()["choices"][0]["text"]


def test_trainer_swaps_weights_through_http(server: str, tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    before = _complete(server)
    perturbed_weights(tiny_checkpoints["llama"], tmp_path / "trained")
    assert _post(server, "/admin/pause", {"mode": "abort"}, key=None).status_code == 401
    assert _post(server, "/admin/pause", {"mode": "abort"}).json()["paused"] is True
    assert _post(server, "/admin/update_weights", {"path": str(tmp_path / "missing")}).status_code == 400
    assert _post(server, "/admin/update_weights", {"path": str(tmp_path / "trained")}).json() == {"weight_version": 1}
    assert _post(server, "/admin/resume").status_code == 200
    after = _complete(server)
    trained = LLM(str(tmp_path / "trained"), dtype="float32")
    expected = trained.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)[0]
    assert after != before
    assert after == expected.outputs[0].text
    # Sleep gives the KV cache back; requests work again after wake_up.
    assert _post(server, "/admin/sleep", {"level": 1}).json() == {"sleeping": 1}
    assert _post(server, "/admin/wake_up").json() == {"sleeping": 0}
    assert _complete(server) == after
    assert _post(server, "/admin/sleep", {"level": 3}).status_code == 400  # validated before anything runs


def test_admin_routes_need_an_api_key(tiny_checkpoints: dict[str, Path]) -> None:
    engine = EngineOptions(model=str(tiny_checkpoints["llama"]), dtype="float32", kv_cache_memory_gb=0.02)
    app = build_app(build_router(ServeOptions(engine=engine)), ServerSettings(served_model_name="tiny"))
    response = TestClient(app).post("/admin/update_weights", json={"path": "/tmp"})
    assert response.status_code == 403 and "--api-key" in response.json()["error"]["message"]
