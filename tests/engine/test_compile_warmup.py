"""Background compile warm-up: the engine serves eagerly at once and switches to the compiled step when it is built."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from torch._dynamo.utils import counters

from hawker import LLM
from hawker.cli import build_parser
from hawker.engine import compiled_decode
from hawker.engine.async_engine import AsyncEngine
from hawker.engine.compiled_decode import CompiledDecode, _dummy_meta, can_compile_on_cpu, scratch_blocks
from hawker.options import EngineOptions
from hawker.server.app import ServerSettings, build_app
from hawker.server.router import ReplicaRouter
from tests.support.parity import assert_parity, make_prompts, reference_generate, run_hawker
from tests.support.server_process import serve_in_process

MAX_ROWS = 8
BLOCK_SIZE = 4  # two scratch blocks for 8 rows
COMPILE_TIMEOUT_S = 600
COMPILE_THREAD = "hawker-compile"


@pytest.fixture
def dynamo_enabled() -> Iterator[None]:
    # conftest turns torch.compile off for the rest of the suite.
    with torch._dynamo.config.patch(disable=False):
        assert can_compile_on_cpu(), "the compiled decode path needs a C++ compiler (g++) on PATH"
        yield


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """The background compile starts only once the test sets this event."""
    opened = threading.Event()
    original = CompiledDecode._compile_steps

    def gated(self: CompiledDecode, *args: Any) -> None:
        if threading.current_thread().name == COMPILE_THREAD:
            assert opened.wait(COMPILE_TIMEOUT_S)
        original(self, *args)

    monkeypatch.setattr(CompiledDecode, "_compile_steps", gated)
    yield opened
    opened.set()  # never leave a thread waiting


@pytest.fixture
def compiled_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of the thread of every call of the compiled forward."""
    calls: list[str] = []
    original = compiled_decode._compile

    def counting_compile(model: torch.nn.Module, cpp_wrapper: bool) -> Callable[..., torch.Tensor]:
        forward = original(model, cpp_wrapper)

        def counted(*args: Any) -> torch.Tensor:
            calls.append(threading.current_thread().name)
            return forward(*args)

        return counted

    monkeypatch.setattr(compiled_decode, "_compile", counting_compile)
    return calls


def _step_calls(calls: list[str]) -> int:
    return sum(name != COMPILE_THREAD for name in calls)


def _complete(url: str) -> httpx.Response:
    body = {"model": "tiny", "prompt": [5, 6, 7, 8, 9], "max_tokens": 4, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def _warming_gauge(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("hawker:engine_warming_up "):
            return float(line.split()[1])
    raise AssertionError("/metrics has no hawker:engine_warming_up")


@pytest.mark.usefixtures("dynamo_enabled")
def test_background_warm_up_serves_eagerly_then_switches_to_the_compiled_step(
    tiny_checkpoints: dict[str, Path], gate: threading.Event, compiled_calls: list[str]
) -> None:
    checkpoint = tiny_checkpoints["llama"]
    prompts = make_prompts(seed=5)
    reference = reference_generate(checkpoint, prompts)
    llm = LLM(
        str(checkpoint),
        dtype="float32",
        block_size=BLOCK_SIZE,
        compile_decode_max_rows=MAX_ROWS,
        compile_warmup="background",
        compile_cpp_wrapper=False,  # its C++ build is covered by test_compiled_decode; here ~15 s more
    )
    engine = llm.engine
    compiled = engine.runner.compiled_decode
    assert compiled is not None and engine.warming_up and not compiled.ready
    # The warm-up's scratch blocks are never handed out to a request.
    cache_blocks = engine.runner.kv_caches[0][0].shape[0]
    assert engine.kv.num_blocks == cache_blocks - scratch_blocks(MAX_ROWS, BLOCK_SIZE) == cache_blocks - 2

    # Before the compile: every step eager, same tokens and logits as transformers.
    tokens, logits = run_hawker(llm, prompts)
    assert_parity(reference, tokens, logits)
    assert compiled_calls == [] and engine.warming_up

    app = build_app(ReplicaRouter([AsyncEngine(engine)]), ServerSettings(served_model_name="tiny"))
    with serve_in_process(app) as url:
        health = httpx.get(f"{url}/health", timeout=10)
        assert health.status_code == 200 and health.json() == {"status": "warming_up"}
        assert _warming_gauge(url) == 1.0
        assert httpx.get(f"{url}/v1/stats", timeout=10).json()["warming_up"] is True
        assert _complete(url).status_code == 200
        # Requests keep being answered while the compile runs beside them.
        gate.set()
        deadline = time.monotonic() + COMPILE_TIMEOUT_S
        answered = 0
        while not compiled.ready and time.monotonic() < deadline and compiled.failure is None:
            assert _complete(url).status_code == 200
            answered += 1
        assert compiled.wait(COMPILE_TIMEOUT_S), compiled.failure
        assert answered > 0
        assert httpx.get(f"{url}/health", timeout=10).json() == {"status": "ok"}
        assert _warming_gauge(url) == 0.0
        assert httpx.get(f"{url}/v1/stats", timeout=10).json()["warming_up"] is False
    assert not engine.warming_up

    # After: decode steps take the compiled graphs, which need no recompiling, with parity kept.
    graphs = counters["stats"]["unique_graphs"]
    before = _step_calls(compiled_calls)
    tokens, logits = run_hawker(llm, prompts)
    assert _step_calls(compiled_calls) > before
    assert counters["stats"]["unique_graphs"] == graphs, "a step compiled a new graph after the warm-up"
    assert_parity(reference, tokens, logits)


@pytest.mark.usefixtures("dynamo_enabled")
def test_failed_background_compile_leaves_the_engine_serving_eagerly(
    tiny_checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(model: torch.nn.Module, cpp_wrapper: bool) -> Any:
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(compiled_decode, "_compile", broken)
    checkpoint = tiny_checkpoints["llama"]
    llm = LLM(str(checkpoint), dtype="float32", compile_decode_max_rows=MAX_ROWS, compile_warmup="background")
    compiled = llm.engine.runner.compiled_decode
    assert compiled is not None
    assert not compiled.wait(COMPILE_TIMEOUT_S)
    assert compiled.failure is not None and "no compiler today" in compiled.failure
    assert "decode steps stay eager" in caplog.text
    assert not llm.engine.warming_up
    prompts = make_prompts(seed=6)[:3]
    tokens, logits = run_hawker(llm, prompts)
    assert_parity(reference_generate(checkpoint, prompts), tokens, logits)


@pytest.mark.parametrize("paged", [False, True])
def test_warm_up_steps_touch_only_the_scratch_blocks(paged: bool) -> None:
    num_blocks, block_size = 10, 4
    first = num_blocks - scratch_blocks(MAX_ROWS, block_size)
    for rows in range(1, MAX_ROWS + 1):
        meta = _dummy_meta(rows, torch.device("cpu"), paged, first, block_size)
        written = meta.slot_mapping // block_size
        assert written.min() >= first and written.max() < num_blocks
        if paged:
            assert bool((meta.paged_decode.block_tables == first).all())
        else:
            read = meta.decode_groups[0].slots // block_size
            assert read.min() >= first and read.max() < num_blocks


def test_compile_warmup_option() -> None:
    with pytest.raises(ValueError, match="compile_warmup"):
        EngineOptions(compile_warmup="lazy")
    parser = build_parser()
    assert parser.parse_args(["serve"]).compile_warmup == "background"
    assert parser.parse_args(["generate", "hi"]).compile_warmup == "blocking"
    assert parser.parse_args(["serve", "--compile-warmup", "blocking"]).compile_warmup == "blocking"


def test_fx_tracing_patches_do_not_reach_other_threads() -> None:
    # What a background compile needs: while torch.fx traces in one thread, modules called in another run normally.
    assert compiled_decode._scope_fx_patches_to_their_thread()
    eager = torch.nn.Linear(2, 2)
    x = torch.ones(1, 2)
    seen: list[torch.Tensor] = []

    class Probe(torch.nn.Module):
        def forward(self, y: torch.Tensor) -> torch.Tensor:
            other = threading.Thread(target=lambda: seen.append(eager(x)))
            other.start()
            other.join()
            return y + 1

    traced = torch.fx.symbolic_trace(Probe())
    assert len(seen) == 1 and torch.equal(seen[0], eager(x))
    assert [node.op for node in traced.graph.nodes] == ["placeholder", "call_function", "output"]
