"""Overlap scheduling: step N+1 is scheduled and launched before step N's tokens are read back.

On a CPU the forward runs when launched, so nothing overlaps in time, but
the engine takes exactly the GPU path's decisions: pending tokens read from
the previous step's tensor, tokens applied one step late, work for a request
that stopped meanwhile ignored. These tests check that this path gives the
same results as reading every step back at once, and transformers' logits.
"""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from hawker import LLM, SamplingParams
from hawker.engine.engine import Engine
from hawker.engine.faults import TokenFault
from hawker.options import EngineOptions
from hawker.outputs import RequestOutput
from hawker.server.app import ServerSettings, build_app
from hawker.server.serve import ServeOptions, build_router
from tests.support.parity import (
    NUM_NEW_TOKENS,
    Reference,
    assert_parity,
    assert_pool_full,
    make_prompts,
    reference_generate,
    run_hawker,
)
from tests.support.server_process import serve_in_process

SETTINGS: dict[str, dict[str, Any]] = {
    "batch": {},
    "chunked_prefill": {"max_num_batched_tokens": 16, "block_size": 4},
    "preemption": {"block_size": 4, "num_kv_blocks": 26},
}


@pytest.fixture(scope="module")
def llama_reference(tiny_checkpoints: dict[str, Path]) -> Reference:
    return reference_generate(tiny_checkpoints["llama"], make_prompts())


def overlapped(checkpoint: Path, **options: Any) -> LLM:
    return LLM(str(checkpoint), dtype="float32", overlap_scheduling=True, **options)


def assert_idle(llm: LLM) -> None:
    """No step failed (its rerun could hide a wrong input), nothing is in flight, every block is back."""
    assert llm.engine.counters.num_step_retries == 0
    assert not llm.engine.has_unfinished_requests()
    assert_pool_full(llm)


@pytest.mark.parametrize("setting", SETTINGS)
def test_overlap_keeps_parity(setting: str, tiny_checkpoints: dict[str, Path], llama_reference: Reference) -> None:
    llm = overlapped(tiny_checkpoints["llama"], **SETTINGS[setting])
    tokens, logits = run_hawker(llm, llama_reference.prompts)
    assert_parity(llama_reference, tokens, logits)
    if setting == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    assert_idle(llm)


def test_overlap_keeps_parity_with_prefix_hits(tiny_checkpoints: dict[str, Path], llama_reference: Reference) -> None:
    llm = overlapped(tiny_checkpoints["llama"], block_size=4)
    # The blocks of tokens read back a step late are cached too: the second round hits them.
    run_hawker(llm, llama_reference.prompts)
    hits_before = llm.engine.kv.stats.hit_tokens
    tokens, logits = run_hawker(llm, llama_reference.prompts)
    assert llm.engine.kv.stats.hit_tokens - hits_before >= sum(len(p) // 4 - 1 for p in llama_reference.prompts) * 4
    assert_parity(llama_reference, tokens, logits)
    assert_idle(llm)


def test_next_step_is_launched_before_the_last_is_read_back(tiny_checkpoints: dict[str, Path]) -> None:
    events: dict[bool, list[str]] = {}
    for overlap in (False, True):
        llm = LLM(str(tiny_checkpoints["llama"]), dtype="float32", overlap_scheduling=overlap)
        events[overlap] = record_launches(llm)
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        llm.generate(make_prompts()[:3], params, use_tqdm=False)
    assert events[False] == [e for i in range(len(events[False]) // 2) for e in (f"launch {i}", f"read {i}")]
    # Overlapped: step i + 1 is queued before step i is read back, every time.
    overlapped_events = events[True]
    for i in range(len(overlapped_events) // 2 - 1):
        assert overlapped_events.index(f"launch {i + 1}") < overlapped_events.index(f"read {i}")


def record_launches(llm: LLM) -> list[str]:
    runner = llm.engine.runner
    launch = runner.launch
    events: list[str] = []

    def recording_launch(*args: Any, **kwargs: Any) -> Any:
        index = sum(e.startswith("launch") for e in events)
        events.append(f"launch {index}")
        handle = launch(*args, **kwargs)
        result = handle.result

        def recording_result() -> Any:
            events.append(f"read {index}")
            return result()

        handle.result = recording_result
        return handle

    runner.launch = recording_launch
    return events


def mixed_requests(baseline: list[list[int]], text: list[str]) -> list[SamplingParams]:
    """One request per feature that reads tokens on the host; stop conditions taken from a greedy baseline."""
    return [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=10, logprobs=3, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=20, seed=3, max_tokens=9, logprobs=2, logprobs_mode="raw"),
        SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=[baseline[3][4]]),
        SamplingParams(temperature=0.0, max_tokens=16, min_tokens=6, stop_token_ids=[baseline[4][2]]),
        SamplingParams(temperature=0.0, max_tokens=16, stop=[text[5][6:10]]),
        SamplingParams(temperature=0.7, seed=11, max_tokens=8, repetition_penalty=1.3, presence_penalty=0.5),
        SamplingParams(temperature=0.9, seed=5, n=2, max_tokens=7, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=5, prompt_logprobs=2, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
    ]


def generate_mixed(
    checkpoint: Path, overlap: bool, prompts: list[list[int]], params: list[SamplingParams]
) -> tuple[LLM, list[RequestOutput]]:
    llm = LLM(str(checkpoint), dtype="float32", overlap_scheduling=overlap, max_num_batched_tokens=32, block_size=4)
    return llm, llm.generate(prompts, params, use_tqdm=False)


def test_overlap_matches_sequential_on_mixed_requests(tiny_checkpoints: dict[str, Path]) -> None:
    checkpoint = tiny_checkpoints["llama"]
    prompts = (make_prompts(seed=3) * 2)[:10]
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    baseline = LLM(str(checkpoint), dtype="float32").generate(prompts, greedy, use_tqdm=False)
    params = mixed_requests([o.outputs[0].token_ids for o in baseline], [o.outputs[0].text for o in baseline])
    sequential, sequential_outputs = generate_mixed(checkpoint, False, prompts, params)
    overlap, overlap_outputs = generate_mixed(checkpoint, True, prompts, params)
    outputs = [o.outputs[0] for o in sequential_outputs]
    # The stop token and stop string really stopped their requests early (else this would not test them).
    assert [outputs[3].finish_reason, outputs[5].finish_reason] == ["stop", "stop"]
    assert outputs[3].stop_reason == params[3].stop_token_ids[0] and outputs[5].stop_reason == params[5].stop[0]
    assert len(outputs[4].token_ids) >= 6  # min_tokens held the stop token back
    for expected, got in zip(sequential_outputs, overlap_outputs, strict=True):
        assert_same_output(expected, got)
    assert_idle(sequential)
    assert_idle(overlap)


def assert_same_output(expected: RequestOutput, got: RequestOutput) -> None:
    assert got.finished
    for want, have in zip(expected.outputs, got.outputs, strict=True):
        assert have.token_ids == want.token_ids, expected.request_id
        assert (have.text, have.finish_reason, have.stop_reason) == (want.text, want.finish_reason, want.stop_reason)
        assert (have.logprobs is None) == (want.logprobs is None)
        for a, b in zip(want.logprobs or [], have.logprobs or [], strict=True):
            assert a.keys() == b.keys()
            assert all(abs(a[t].logprob - b[t].logprob) <= 1e-4 and a[t].rank == b[t].rank for t in a)
    assert (got.prompt_logprobs is None) == (expected.prompt_logprobs is None)
    for a, b in zip(expected.prompt_logprobs or [], got.prompt_logprobs or [], strict=True):
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert a.keys() == b.keys() and all(abs(a[t].logprob - b[t].logprob) <= 1e-4 for t in a)


def drive(engine: Engine, until: Callable[[], bool], limit: int = 200) -> dict[str, RequestOutput]:
    """Step ``engine`` until ``until()``; returns the last output of every request."""
    last: dict[str, RequestOutput] = {}
    for _ in range(limit):
        if until():
            return last
        for output in engine.step():
            last[output.request_id] = output
    raise AssertionError("the engine did not get there")


def greedy_tokens(checkpoint: Path, prompts: dict[str, list[int]], max_tokens: int) -> dict[str, list[int]]:
    llm = LLM(str(checkpoint), dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate(list(prompts.values()), params, use_tqdm=False)
    return {name: o.outputs[0].token_ids for name, o in zip(prompts, outputs, strict=True)}


def overlapped_engine(checkpoint: Path) -> Engine:
    return Engine.from_options(EngineOptions(model=str(checkpoint), dtype="float32", overlap_scheduling=True))


def test_abort_while_its_step_is_in_flight(tiny_checkpoints: dict[str, Path]) -> None:
    checkpoint = tiny_checkpoints["llama"]
    prompts = dict(zip(("a", "b", "c"), make_prompts(seed=5)[:3], strict=True))
    expected = greedy_tokens(checkpoint, prompts, NUM_NEW_TOKENS)
    engine = overlapped_engine(checkpoint)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    for name, prompt in prompts.items():
        engine.add_request(name, prompt, params)
    drive(engine, lambda: engine.counters.num_steps >= 4)
    in_flight = engine._in_flight
    assert in_flight is not None and "b" in [r.request_id for r in in_flight.committed.sampled]
    final = engine.abort("b")
    assert final is not None and final.outputs[0].finish_reason == "abort"
    assert -1 not in final.outputs[0].token_ids  # no pending placeholder leaks out
    last = drive(engine, lambda: not engine.has_unfinished_requests())
    assert last["a"].outputs[0].token_ids == expected["a"]
    assert last["c"].outputs[0].token_ids == expected["c"]
    assert "b" not in last
    assert engine.counters.num_step_retries == 0
    engine.kv.check_invariants()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_failing_step_with_a_step_in_flight_fails_only_its_request(tiny_checkpoints: dict[str, Path]) -> None:
    checkpoint = tiny_checkpoints["llama"]
    prompts = dict(zip(("a", "b"), make_prompts(seed=6)[:2], strict=True))
    expected = greedy_tokens(checkpoint, prompts, NUM_NEW_TOKENS)
    engine = overlapped_engine(checkpoint)
    marker = 2
    engine.pre_execute_hooks.append(TokenFault(marker))
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    for name, prompt in prompts.items():
        engine.add_request(name, prompt, params)
    drive(engine, lambda: engine.counters.num_steps >= 3)
    assert engine._in_flight is not None
    engine.add_request("bad", [5, marker, 7, 9], params)
    last = drive(engine, lambda: not engine.has_unfinished_requests())
    assert last["bad"].outputs[0].finish_reason == "error" and "injected fault" in (last["bad"].error or "")
    assert last["a"].outputs[0].token_ids == expected["a"]
    assert last["b"].outputs[0].token_ids == expected["b"]
    assert engine.counters.num_step_retries == 1  # only the step that met the fault
    engine.kv.check_invariants()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_pause_reads_back_the_step_in_flight(tiny_checkpoints: dict[str, Path]) -> None:
    checkpoint = tiny_checkpoints["llama"]
    prompts = {"a": make_prompts(seed=7)[2]}
    expected = greedy_tokens(checkpoint, prompts, NUM_NEW_TOKENS)
    engine = overlapped_engine(checkpoint)
    engine.add_request("a", prompts["a"], SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True))
    seen = drive(engine, lambda: engine.counters.num_steps >= 3)
    before = len(seen["a"].outputs[0].token_ids)
    drained = engine.pause_generation(mode="keep")
    # The step in flight is read back by the pause, its output returned there.
    assert engine._in_flight is None
    assert [len(o.outputs[0].token_ids) for o in drained] == [before + 1]
    assert engine.step() == []  # paused
    engine.resume_generation()
    last = drive(engine, lambda: not engine.has_unfinished_requests())
    assert last["a"].outputs[0].token_ids == expected["a"]
    assert engine.counters.num_step_retries == 0


def test_overlap_needs_one_process() -> None:
    with pytest.raises(ValueError, match="overlap_scheduling"):
        EngineOptions(overlap_scheduling=True, tensor_parallel_size=2)
    assert EngineOptions(overlap_scheduling=None, tensor_parallel_size=2).world_size == 2


def test_server_streams_with_overlap(tiny_checkpoints: dict[str, Path]) -> None:
    """The HTTP path (AsyncEngine loop, streaming) on an overlapped engine gives the sequential engine's text."""
    checkpoint = tiny_checkpoints["llama"]
    prompts = make_prompts(seed=8)[1:4]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = [o.outputs[0].text for o in LLM(str(checkpoint), dtype="float32").generate(prompts, params)]
    engine = EngineOptions(model=str(checkpoint), dtype="float32", kv_cache_memory_gb=0.02, overlap_scheduling=True)
    router = build_router(ServeOptions(engine=engine))
    app = build_app(router, ServerSettings(served_model_name="tiny"))
    with serve_in_process(app) as base_url, concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        streamed = list(pool.map(lambda prompt: stream_text(base_url, prompt), prompts))
    assert streamed == expected
    served = router.replicas[0].engine
    assert served.config.overlap_scheduling and served.counters.num_step_retries == 0


def stream_text(base_url: str, prompt: list[int]) -> str:
    """Stream a greedy completion; the text of its chunks, checked to end with finish_reason "length"."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True, "ignore_eos": True}
    text, finish = "", None
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[len("data: ") :])["choices"][0]
            text += choice["text"]
            finish = choice.get("finish_reason") or finish
    assert finish == "length"
    return text
