"""Schemathesis over a real server's /openapi.json: no input it generates gets a 5xx.

Every operation the document lists is fuzzed with bodies, query strings and
paths that fit its schema (positive) and that break it (negative), with a
fixed seed and a bounded number of examples, so a run is repeatable and
short. Every response must be below 500; every 4xx must carry OpenAI's
error shape; every stream must end with ``[DONE]``.

The server runs with an API key (the admin routes exist only then), and the
fuzzer sends it. Its model has a 64-token context, so no generated request
can keep it busy for long.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from tests.support.server_process import API_KEY, ServerProcess, launch, wait_ready
from tests.support.tiny_models import build_tiny_checkpoint

AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Per operation and generation mode: enough to reach the odd corners, small enough that the
# whole file takes about half a minute on 2 cores.
EXAMPLES = 25
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    torch.manual_seed(3)
    checkpoint = build_tiny_checkpoint("llama", tmp_path_factory.mktemp("fuzz") / "llama", max_positions=64)
    process = launch(checkpoint, tmp_path_factory.mktemp("fuzz-log") / "server.log", "--api-key", API_KEY)
    try:
        yield wait_ready(process)
    finally:
        process.stop()


def check_response(response: schemathesis.Response, label: str) -> None:
    detail = f"{label} -> {response.status_code}: {response.text[:500]}"
    assert response.status_code < 500, detail
    if 400 <= response.status_code < 500:
        body = response.json()
        assert isinstance(body, dict) and set(body) == {"error"}, detail
        assert set(body["error"]) == ERROR_KEYS, detail
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], detail
    if response.status_code == 200 and response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        events = [line for line in response.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "data: [DONE]", detail


def _fuzz(server: ServerProcess, operation: schemathesis.APIOperation, mode: GenerationMode) -> None:
    failures: list[str] = []

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,  # the same examples every run: a failure here is a real one, not luck
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode).map(_served_model))
    def run(case: schemathesis.Case) -> None:
        response = case.call(base_url=server.base_url, headers=AUTH, timeout=60)
        try:
            check_response(response, f"{case.method} {case.formatted_path} {json.dumps(_body(case))[:300]}")
        except AssertionError as error:
            failures.append(str(error))
            raise

    run()
    assert not failures


def _served_model(case: schemathesis.Case) -> schemathesis.Case:
    """Most generated ``model`` strings name no model (a 404 before anything else runs): leave it out."""
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body = {key: value for key, value in case.body.items() if key != "model"}
    return case


def _body(case: schemathesis.Case) -> object:
    body = case.body
    return body if isinstance(body, dict | list | str | int | float | bool | None) else repr(body)


def _operations(server: ServerProcess) -> list[schemathesis.APIOperation]:
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json", headers=AUTH, timeout=30)
    return [result.ok() for result in schema.get_all_operations()]


def test_every_operation_is_fuzzed_without_a_server_error(server: ServerProcess) -> None:
    operations = _operations(server)
    labels = {f"{op.method.upper()} {op.path}" for op in operations}
    for expected in (
        "POST /v1/completions",
        "POST /v1/chat/completions",
        "POST /tokenize",
        "POST /admin/update_weights",
    ):
        assert expected in labels
    # The admin routes run last: a pause or sleep they cause does not keep the others from being fuzzed.
    for op in sorted(operations, key=lambda op: op.path.startswith("/admin/")):
        _fuzz(server, op, GenerationMode.POSITIVE)
        if len(op.body) or len(op.query) or len(op.path_parameters):  # else there is nothing to break
            _fuzz(server, op, GenerationMode.NEGATIVE)
    log = server.log()
    assert "Traceback" not in log, log[-3000:]


def test_openapi_declares_error_responses(server: ServerProcess) -> None:
    document = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json", headers=AUTH).raw_schema
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            responses = operation["responses"]
            assert "422" not in responses, f"{method} {path} advertises a 422 the server never sends"
            assert "default" in responses and "500" in responses, f"{method} {path}"
            if "requestBody" in operation:
                assert "400" in responses, f"{method} {path} takes a body but declares no 400"
            for status, response in responses.items():
                if status.startswith(("4", "5")) or status == "default":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, f"{method} {path} {status}"
    detail = document["components"]["schemas"]["ErrorDetail"]
    assert set(detail["properties"]) == ERROR_KEYS
