"""A rollout engine for an RL trainer, made to run as a Ray actor.

    import ray
    from hawker import SamplingParams
    from hawker.ray import PackedWeights, RolloutEngine

    engine = ray.remote(RolloutEngine).options(num_cpus=1).remote("path/to/policy", dtype="float32")
    outputs = ray.get(engine.generate.remote(prompts, SamplingParams(n=8, temperature=1.0, logprobs=0)))
    outputs[0].weight_version                                    # the weights that produced it

    ray.get(engine.pause.remote("keep"))                         # hold the requests in flight
    ray.get(engine.update_weights.remote(ray.put(PackedWeights.of(state_dict.items()))))
    ray.get(engine.resume.remote())

The methods are coroutines, so Ray runs the actor as an async actor: many
``generate`` calls may be in flight at once and share the engine's
continuous batching, and ``pause`` / weight updates arrive while they run
(each runs between two steps). Weights come either as tensors through Ray's
object store (``update_weights``) or over a collective group that the
trainer and every engine join (``join_weight_sync`` once, then
``receive_weights`` each step while the trainer broadcasts:
hawker/ray/weight_sync.py). Every output carries ``weight_version``, which
each update bumps by one.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from hawker.engine.async_engine import AsyncEngine, Submission
from hawker.engine.engine import Engine
from hawker.llm import Prompt, tokenize_prompt
from hawker.options import EngineOptions
from hawker.outputs import RequestOutput
from hawker.ray.weight_sync import PackedWeights, WeightSpec, WeightSyncGroup
from hawker.sampling_params import SamplingParams

WeightsArg = Mapping[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]]


class RolloutEngine:
    """A Hawker engine behind an async API: ``ray.remote(RolloutEngine).remote(model, **options)``.

    ``model`` and ``options`` are ``hawker.LLM``'s (EngineOptions' fields).
    """

    def __init__(self, model: str | None = None, **options: Any) -> None:
        self._engine = Engine.from_options(EngineOptions(model=model, **options))
        self._async: AsyncEngine | None = None  # started on the actor's event loop, at the first call
        self._ids = itertools.count()
        self._sync_group: WeightSyncGroup | None = None
        self.last_update_s = 0.0  # how long the last update took to write into the engine (not to arrive)

    def _running(self) -> AsyncEngine:
        if self._async is None:
            self._async = AsyncEngine(self._engine, max_waiting_requests=1 << 20)
            self._async.start()
        return self._async

    async def generate(
        self, prompts: Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in input order.

        Requests held by ``pause("keep")`` finish after ``resume``; those
        ended by ``pause("abort")`` come back with finish_reason "abort".
        """
        engine = self._running()
        params = _params_for(sampling_params, len(prompts))
        submissions = []
        for prompt, param in zip(prompts, params, strict=True):
            text, ids = tokenize_prompt(engine.tokenizer, prompt)
            submissions.append(Submission(f"rollout-{next(self._ids)}", ids, param, text))
        streams = engine.submit_many(submissions)
        try:
            return list(await asyncio.gather(*(stream.final() for stream in streams)))
        finally:
            for stream in streams:
                stream.close()  # aborts whatever did not finish (a cancelled call)

    async def pause(self, mode: str = "keep") -> int:
        """Stop stepping between two steps; ``"keep"`` holds the requests in flight, ``"abort"`` ends
        them. Returns how many requests it ended."""
        finished = await self._running().call(lambda engine: engine.pause_generation(mode))
        return len(finished)

    async def resume(self) -> None:
        await self._running().call(lambda engine: engine.resume_generation())

    async def update_weights(self, weights: WeightsArg | PackedWeights) -> int:
        """New values for some or all weights: (HF name, tensor) pairs, a state dict, or (fastest through
        the object store) ``ray.put(PackedWeights.of(model.state_dict().items()))``; returns the new
        weight version."""
        if isinstance(weights, PackedWeights):
            items = weights.tensors()
        else:
            items = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
        return int(await self._running().call(lambda engine: self._write(engine, items)))

    def _write(self, engine: Engine, items: list[tuple[str, torch.Tensor]]) -> int:
        start = time.perf_counter()
        version = engine.update_weights(items)
        self.last_update_s = time.perf_counter() - start
        return version

    async def join_weight_sync(self, host: str, port: int, rank: int, world_size: int) -> None:
        """Join the trainer's weight-sync group as ``rank`` (1..N; the trainer is 0); every member
        joins at once, so call this on every engine before the trainer's own join returns."""
        device = str(self._engine.config.device)
        self._sync_group = await asyncio.to_thread(WeightSyncGroup, host, port, rank, world_size, device)

    async def receive_weights(self, specs: Sequence[WeightSpec]) -> int:
        """Receive the tensors of ``specs`` as the trainer broadcasts them, then take them in place;
        returns the new weight version. Generation goes on while the tensors arrive."""
        if self._sync_group is None:
            raise ValueError("join_weight_sync first")
        items = await asyncio.to_thread(self._sync_group.receive, specs)
        return await self.update_weights(items)

    async def sleep(self, level: int = 1) -> None:
        """Give memory back to a trainer on the same device until ``wake_up``: level 1 the KV cache,
        level 2 the weights too (then send the weights again after waking). Needs no request in flight."""
        await self._running().call(lambda engine: engine.sleep(level))

    async def wake_up(self) -> None:
        await self._running().call(lambda engine: engine.wake_up())

    async def weight_version(self) -> int:
        return int(self._engine.weight_version)

    async def update_seconds(self) -> float:
        """How long the last update took to write into the engine (the in-process part of a sync)."""
        return self.last_update_s

    async def close(self) -> None:
        if self._async is not None:
            self._async.stop()
        self._engine.shutdown()


def _params_for(params: SamplingParams | Sequence[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * count
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts")
    return list(params)
