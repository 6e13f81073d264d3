"""hawker.ray.RolloutEngine's API, driven directly on an event loop (Ray runs it the same way, as an async
actor; tests/examples/test_ray_rl.py runs it under Ray): generation, pause and resume, weights through
the object-store path (tensors) and through a weight-sync group, the weight version on every output."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from hawker import LLM, SamplingParams
from hawker.distributed.launch import free_port
from hawker.ray import PackedWeights, RolloutEngine, WeightSyncGroup, weight_specs
from tests.support.tiny_models import checkpoint_state

PROMPTS = [[5, 9, 14, 3], [40, 2, 2, 17, 8]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0)
OPTIONS = {"dtype": "float32", "block_size": 4, "compile_decode_max_rows": 0}


def _greedy_tokens(checkpoint: Path) -> list[list[int]]:
    with LLM(str(checkpoint), **OPTIONS) as llm:
        return [list(out.outputs[0].token_ids) for out in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_weights_through_tensors_give_the_trained_models_outputs_and_a_new_version(
    tiny_checkpoints: dict[str, Path], trained_llama: Path
) -> None:
    want_before, want_after = _greedy_tokens(tiny_checkpoints["llama"]), _greedy_tokens(trained_llama)
    assert want_before != want_after

    async def scenario() -> None:
        engine = RolloutEngine(str(tiny_checkpoints["llama"]), **OPTIONS)
        try:
            before = await engine.generate(PROMPTS, GREEDY)
            assert [list(o.outputs[0].token_ids) for o in before] == want_before
            as_dicts = await engine.generate([{"prompt_token_ids": ids} for ids in PROMPTS], GREEDY)
            assert [list(o.outputs[0].token_ids) for o in as_dicts] == want_before
            (text,) = await engine.generate(["hello world"], GREEDY)  # tokenized by the engine
            assert text.prompt == "hello world" and len(text.outputs[0].token_ids) == GREEDY.max_tokens
            with pytest.raises(ValueError, match="prompt_token_ids"):
                await engine.generate([{"text": "no such key"}], GREEDY)
            assert {o.weight_version for o in before} == {0}
            assert (
                await engine.update_weights(checkpoint_state(trained_llama)) == 1
            )  # a state dict, as ray.put would carry it
            after = await engine.generate(PROMPTS, GREEDY)
            assert [list(o.outputs[0].token_ids) for o in after] == want_after
            assert {o.weight_version for o in after} == {1} and await engine.weight_version() == 1
            # The object store's fast form: raw bytes read in place; the same weights, the next version.
            assert await engine.update_weights(PackedWeights.of(checkpoint_state(trained_llama).items())) == 2
            assert [list(o.outputs[0].token_ids) for o in await engine.generate(PROMPTS, GREEDY)] == want_after
            with pytest.raises(ValueError, match="no_such_weight"):  # a bad update changes nothing
                await engine.update_weights([("no_such_weight", torch.zeros(2))])
            assert await engine.weight_version() == 2
        finally:
            await engine.close()

    asyncio.run(scenario())


def test_weights_over_a_sync_group_match_the_trained_model(
    tiny_checkpoints: dict[str, Path], trained_llama: Path
) -> None:
    want = _greedy_tokens(trained_llama)
    state = checkpoint_state(trained_llama)
    port = free_port()

    async def scenario() -> None:
        engine = RolloutEngine(str(tiny_checkpoints["llama"]), **OPTIONS)
        trainer: list[WeightSyncGroup] = []
        try:
            # The trainer (rank 0) and the engine (rank 1) join at once; the trainer here is a thread.
            joining = threading.Thread(target=lambda: trainer.append(WeightSyncGroup("127.0.0.1", port, 0, 2)))
            joining.start()
            await engine.join_weight_sync("127.0.0.1", port, 1, 2)
            joining.join()
            sending = threading.Thread(target=trainer[0].send, args=(state.items(),))
            sending.start()
            version = await engine.receive_weights(weight_specs(state.items()))
            sending.join()
            assert version == 1
            outputs = await engine.generate(PROMPTS, GREEDY)
            assert [list(o.outputs[0].token_ids) for o in outputs] == want
            assert {o.weight_version for o in outputs} == {1}
        finally:
            await engine.close()

    asyncio.run(scenario())


def test_pause_keep_holds_requests_and_pause_abort_ends_them(tiny_checkpoints: dict[str, Path]) -> None:
    # 240 tokens take ~100 steps of a few ms each: still running when the pause comes 20 ms in.
    long = SamplingParams(temperature=0.0, max_tokens=240, ignore_eos=True)

    async def scenario() -> None:
        engine = RolloutEngine(str(tiny_checkpoints["llama"]), **OPTIONS)
        try:
            running = asyncio.create_task(engine.generate(PROMPTS, long))
            await asyncio.sleep(0.02)
            assert await engine.pause("keep") == 0
            await asyncio.sleep(0.3)
            assert not running.done()  # held, not finished and not dropped
            assert await engine.update_weights(checkpoint_state(tiny_checkpoints["llama"])) == 1
            await engine.resume()
            kept = await asyncio.wait_for(running, 60)
            assert [o.outputs[0].finish_reason for o in kept] == ["length", "length"]
            assert [len(o.outputs[0].token_ids) for o in kept] == [240, 240]
            assert {o.weight_version for o in kept} == {1}  # finished under the new weights

            # Held first (deterministic: nothing can finish), then ended.
            assert await engine.pause("keep") == 0
            running = asyncio.create_task(engine.generate(PROMPTS, long))
            await asyncio.sleep(0.1)
            assert await engine.pause("abort") == 2
            aborted = await asyncio.wait_for(running, 10)
            assert [o.outputs[0].finish_reason for o in aborted] == ["abort", "abort"]
            await engine.resume()
            assert (await engine.generate(PROMPTS[:1], GREEDY))[0].outputs[0].finish_reason == "length"
            await engine.sleep(1)  # the KV cache given back (a colocated trainer's turn), then taken again
            await engine.wake_up()
            assert (await engine.generate(PROMPTS[:1], GREEDY))[0].outputs[0].finish_reason == "length"
        finally:
            await engine.close()

    asyncio.run(scenario())


def test_packed_weights_round_trip_every_dtype_and_shape() -> None:
    weights = [
        ("a", torch.randn(3, 5, dtype=torch.bfloat16)),
        ("b", torch.randn(7)),
        ("c", torch.arange(12, dtype=torch.int64).reshape(2, 2, 3).transpose(0, 2)),  # not contiguous
        ("d", torch.tensor(2.5, dtype=torch.float16)),  # 0-d
        ("e", torch.zeros(0, 4)),
    ]
    unpacked = PackedWeights.of(weights).tensors()
    assert [name for name, _ in unpacked] == [name for name, _ in weights]
    for (_, got), (_, want) in zip(unpacked, weights, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
