"""Engine: add_request / step / abort over a scheduler, a runner and an output processor.

One step is schedule -> execute -> update: ``Scheduler.schedule`` picks the
work (hawker/engine/scheduler.py), a ``Runner`` executes it
(hawker/engine/runner.py), ``Scheduler.update`` applies the sampled tokens
and stops requests, and the ``OutputProcessor`` turns them into
``RequestOutput``s (hawker/engine/output_processor.py). The loop, sequential
or overlapped, is chosen once at start-up. A user request with ``n > 1`` is
a group of ``n`` sequences; siblings reuse the first one's prompt blocks.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

from hawker.config import EngineConfig, ParallelConfig
from hawker.engine.configure import engine_config, resolve_device
from hawker.engine.constraints import Constraints
from hawker.engine.errors import EngineFatalError
from hawker.engine.kv_cache import KVCacheManager, kv_runs_on
from hawker.engine.loading import build_model, eos_id, num_kv_blocks, start_driver, warm_up_blocks
from hawker.engine.model_runner import ModelRunner
from hawker.engine.output_processor import OutputProcessor
from hawker.engine.request import Request, RequestStatus
from hawker.engine.request_checks import RequestLimits, check_request
from hawker.engine.runner import Runner, WeightSource
from hawker.engine.scheduler import CommittedStep, Scheduler
from hawker.loader.tokenizer import load_tokenizer
from hawker.models.base import CausalLM
from hawker.options import EngineOptions
from hawker.outputs import RequestOutput
from hawker.sampling_params import SamplingParams
from hawker.step import ModelOutput, ScheduledSeq, SchedulerOutput, SeqResult, StepHandle

if TYPE_CHECKING:
    from hawker.distributed.launch import RankGroup
    from hawker.distributed.world import World

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's gauges and counters (for /metrics)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    num_steps: int
    num_failed_requests: int
    # Structured outputs (hawker/structured/).
    constrained_requests: int = 0
    grammar_compiles: int = 0
    grammar_cache_hits: int = 0
    grammar_compile_failures: int = 0
    grammar_compile_seconds: float = 0.0
    masked_steps: int = 0
    mask_fill_seconds: float = 0.0
    mask_wait_seconds: float = 0.0


# A hook run before each forward pass with the sequences it is about to run;
# raising from it fails them exactly as a model error would (tests inject faults).
StepHook = Callable[[tuple[ScheduledSeq, ...]], None]


@dataclass
class _Counters:
    num_steps: int = 0
    num_failed_requests: int = 0
    num_step_retries: int = 0  # steps whose forward raised and were rerun one sequence at a time


@dataclass(frozen=True)
class _InFlight:
    """A launched step whose sampled tokens have not been read back (overlap scheduling)."""

    committed: CommittedStep
    handle: StepHandle


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        model: CausalLM,
        tokenizer: PreTrainedTokenizerBase,
        world: World | None = None,
        workers: RankGroup | None = None,
    ) -> None:
        """``world``: this is rank 0 of several (``workers``: the ranks it started itself)."""
        self.config = config
        self.tokenizer = tokenizer
        num_blocks = num_kv_blocks(config, model)
        if world is not None:
            num_blocks = world.min_over_ranks(num_blocks)  # every rank's pool must hold the same blocks
        # A background compile's dummy steps write to the cache's last blocks: never handed out.
        reserved = warm_up_blocks(config)
        if num_blocks <= reserved:
            raise ValueError(f"the KV pool has {num_blocks} blocks; the background compile needs {reserved} more")
        self.kv = KVCacheManager(
            num_blocks - reserved, config.cache.block_size, config.cache.enable_prefix_caching, kv_runs_on()
        )
        self.eos_token_id = eos_id(config.model, tokenizer)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.eos_token_id)
        self.outputs = OutputProcessor(tokenizer, self.scheduler)
        self.constraints = Constraints(
            tokenizer,
            config.model.vocab_size,
            self.eos_token_id,
            config.grammar_compile_timeout_s,
            config.reasoning_parser,
        )
        self.grammars = self.constraints.grammars  # what the server checks requests' constraints with
        self.runner = _runner(config, model, num_blocks, self.eos_token_id, world, workers)
        self.weight_version = 0  # bumped by every update_weights; reported on every output
        self.paused = False  # pause_generation: steps do nothing until resume_generation
        self.sleep_level = 0  # sleep(): 1 = KV cache released, 2 = weights too
        self.threads_before: int | None = None  # torch's thread count before a distributed engine shared the cores
        self._arrivals = itertools.count()
        self.counters = _Counters()
        self.pre_execute_hooks: list[StepHook] = []
        self._in_flight: _InFlight | None = None  # overlap scheduling: the step launched last
        self._undelivered: list[RequestOutput] = []  # outputs of a step completed outside step()
        # The loop, chosen once: the overlapped one launches step N+1 before reading N back. (The plain
        # function, not a bound method: that would be a reference cycle, and the engine with its KV cache
        # would wait for the garbage collector instead of going when its last user lets go of it.)
        self._step_once = Engine._step_overlapped if config.overlap_scheduling else Engine._step_sequential
        logger.info(
            "engine ready: %s, %d KV blocks of %d tokens",
            config.model.architecture,
            num_blocks,
            config.cache.block_size,
        )

    @classmethod
    def from_options(cls, options: EngineOptions) -> Engine:
        options = dataclasses.replace(options, device=resolve_device(options.device))
        if options.world_size > 1:
            return cls._distributed(options)
        config, checkpoint = engine_config(options, ParallelConfig())
        model = build_model(config, checkpoint)
        return cls(config, model, load_tokenizer(Path(checkpoint.path)))

    @classmethod
    def _distributed(cls, options: EngineOptions) -> Engine:
        """Rank 0 of a tensor x pipeline parallel world, the other ranks started (or joined, under torchrun)."""
        from hawker.distributed.world import leave_world

        shard, workers = start_driver(options)
        try:
            engine = cls(shard.config, shard.model, shard.tokenizer, world=shard.world, workers=workers)
        except BaseException:
            if workers is not None:
                workers.kill()
            leave_world()
            raise
        engine.threads_before = shard.threads_before
        return engine

    # ------------------------------------------------------------- lifecycle
    @property
    def warming_up(self) -> bool:
        """The compiled decode step is being built in the background (steps run eager meanwhile)."""
        return self.runner.warming_up

    def check_health(self) -> None:
        """Raise ``EngineFatalError`` if a part of the engine outside this process has died."""
        self.runner.check_health()

    def shutdown(self) -> None:
        """Stop the other ranks of a distributed engine (nothing to do in one process)."""
        self.runner.shutdown()
        if self.threads_before is not None:
            torch.set_num_threads(self.threads_before)
            self.threads_before = None

    # --------------------------------------------------------- weight updates
    def update_weights(self, weights: WeightSource) -> int:
        """Load new values of some or all weights in place; returns the new weight version.

        ``weights``: (Hugging Face name, tensor) pairs, as a trainer's
        ``state_dict().items()`` gives them (only changed tensors are needed),
        or a directory of safetensors files (every file it reads must lie inside
        it, and their headers are checked first: hawker/loader/update_files.py).
        Every name, dtype and shape is checked before anything is written, so a
        bad update changes nothing. Cached prefixes computed with the old
        weights are never matched again.
        """
        self._drain()  # the step in flight sampled with the old weights: read it back first
        written = self.runner.update_weights(weights)
        self.kv.invalidate_prefix_cache()
        self.weight_version += 1
        logger.info("weights updated: %d tensors, version %d", written, self.weight_version)
        return self.weight_version

    def pause_generation(self, mode: str = "abort") -> list[RequestOutput]:
        """Stop stepping, e.g. while a trainer updates the weights; returns the outputs this produced.

        ``mode="abort"`` finishes every request in flight (finish_reason
        "abort"; their final outputs are returned); ``"keep"`` leaves them
        waiting, to continue after ``resume_generation`` (tokens sampled
        before and after an update then come from different weights).
        """
        if mode not in ("abort", "keep"):
            raise ValueError(f"mode must be 'abort' or 'keep', got {mode!r}")
        self.paused = True
        self._drain()
        outputs, self._undelivered = self._undelivered, []
        if mode == "keep":
            return outputs
        groups = list(self.outputs.groups)
        return outputs + [self._finish_group(request_id, RequestStatus.FINISHED_ABORTED) for request_id in groups]

    def resume_generation(self) -> None:
        if self.sleep_level:
            raise ValueError("the engine is asleep: call wake_up() before resume_generation()")
        self.paused = False

    def sleep(self, level: int = 1) -> None:
        """Give memory back (for a trainer on the same device): level 1 the KV cache, level 2 the weights too.

        Needs no request in flight. Generation is paused until ``wake_up``;
        after level 2, wake_up reloads the weights from the checkpoint
        (so pass the trainer's weights with update_weights again).
        """
        if level not in (1, 2):
            raise ValueError(f"level must be 1 or 2, got {level}")
        self._drain()
        if self.has_unfinished_requests():
            raise ValueError("requests are in flight: pause_generation(mode='abort') or let them finish first")
        if self.sleep_level:
            raise ValueError("the engine is asleep already")
        self.runner.release_memory(weights=level == 2)
        self.paused = True
        self.kv.invalidate_prefix_cache()  # the cached blocks' contents are gone
        self.sleep_level = level

    def wake_up(self) -> None:
        """Take the memory back (reloading the checkpoint's weights after level 2) and resume generation."""
        if not self.sleep_level:
            return
        reload = self.sleep_level == 2
        self.runner.restore_memory(self.config.model_path if reload else None)
        if reload:
            self.weight_version += 1  # back to the checkpoint's weights
        self.sleep_level = 0
        self.paused = False

    # ------------------------------------------------------------- requests
    @property
    def max_model_len(self) -> int:
        return self.config.scheduler.max_model_len

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Validate and queue a request. A rejected request allocates nothing."""
        if request_id in self.outputs.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        max_tokens = self.validate(prompt_token_ids, params)
        arrived = time.monotonic() if arrival_time is None else arrival_time
        seqs: list[Request] = []
        for index in range(params.n):
            seqs.append(
                Request(
                    request_id=request_id if params.n == 1 else f"{request_id}#{index}",
                    prompt_token_ids=list(prompt_token_ids),
                    sampling_params=params,
                    max_tokens=max_tokens,
                    arrival_index=next(self._arrivals),
                    parent_id=request_id,
                    sample_index=index,
                    prefix_donor_id=seqs[0].request_id if index else None,
                    arrival_time=arrived,
                    grammar=self.constraints.grammar(params, prompt_token_ids, new_request=index == 0),
                )
            )
        self.outputs.add(request_id, prompt, seqs)
        for seq in seqs:
            self.scheduler.add(seq)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Check a request against the model, the pool and its constraint; returns its max_tokens.

        Reads only configuration (and the thread-safe grammar cache), so another
        thread may call it while a step runs.
        """
        limits = RequestLimits(self.config.model.vocab_size, self.max_model_len, self.kv.block_size, self.kv.num_blocks)
        max_tokens = check_request(prompt_token_ids, params, limits)
        if params.structured_outputs is not None:
            self.grammars.check(params.structured_outputs)
        return max_tokens

    def abort(self, request_id: str) -> RequestOutput | None:
        """Abort a request at any point; every block it holds returns to the pool.

        Returns its final output (finish_reason "abort" for the sequences still
        running), or None if the request is unknown or already finished.
        """
        if request_id not in self.outputs.groups:
            return None
        return self._finish_group(request_id, RequestStatus.FINISHED_ABORTED)

    def fail(self, request_id: str, reason: str) -> RequestOutput:
        """Finish every sequence of a request with finish_reason "error"; returns its final output."""
        self.counters.num_failed_requests += 1
        output = self._finish_group(request_id, RequestStatus.FINISHED_ERROR)
        output.error = reason
        return output

    def _finish_group(self, request_id: str, status: RequestStatus) -> RequestOutput:
        """Finish every unfinished sequence of a request with ``status``; returns its final output."""
        group = self.outputs.groups[request_id]
        for seq in group.seqs:
            if not seq.finished:
                self.scheduler.finish(seq.request_id, status)
        return self.outputs.output(group, self.weight_version)

    def has_unfinished_requests(self) -> bool:
        """Requests are running, or a step is in flight, or outputs wait to be returned by ``step()``."""
        return bool(self.outputs.groups) or self._in_flight is not None or bool(self._undelivered)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.outputs.groups)

    def stats(self) -> EngineStats:
        kv = self.kv
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=kv.usage,
            prefix_cache_queries=kv.stats.queried_tokens,
            prefix_cache_hits=kv.stats.hit_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.scheduler.num_prompt_tokens,
            generation_tokens=self.scheduler.num_generation_tokens,
            num_steps=self.counters.num_steps,
            num_failed_requests=self.counters.num_failed_requests,
            **self.constraints.stats(),
        )

    # ----------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one schedule -> execute -> update round; returns outputs of requests that changed.

        If the forward pass raises, the step's sequences are run again one at
        a time, so that only the requests that fail alone are failed (with
        finish_reason "error"); the others continue. ``EngineFatalError`` is
        not contained: it propagates to the caller.
        """
        outputs, self._undelivered = self._undelivered, []
        if self.paused:
            return outputs
        return outputs + self._step_once(self)

    def _step_sequential(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if scheduled.empty:
            return []
        self.counters.num_steps += 1
        try:
            handle = self._launch(scheduled.seqs)
        except EngineFatalError:
            raise
        except Exception as error:  # isolate the requests that cause it
            return self._retry_one_by_one(scheduled, error)
        return self._update(self.scheduler.commit(scheduled), _read_back(handle))

    def _step_overlapped(self) -> list[RequestOutput]:
        """Schedule and launch step N+1 (its sequences sampled by N read N's tokens on the device), then
        read N back and apply it, so the device has N+1 to run while the host does that work. A request
        that stops on a read-back token has its part of N+1 ignored."""
        outputs: list[RequestOutput] = []
        if self._in_flight is not None and not _can_overlap(self._in_flight):
            outputs += self._complete_in_flight()
        scheduled = self.scheduler.schedule()
        if scheduled.empty:
            return outputs + self._complete_in_flight()
        self.counters.num_steps += 1
        previous = self._in_flight
        try:
            handle = self._launch(scheduled.seqs, None if previous is None else previous.handle)
        except EngineFatalError:
            raise
        except Exception as error:
            outputs += self._complete_in_flight()
            return outputs + self._retry_one_by_one(self._with_known_tokens(scheduled), error)
        self._in_flight = _InFlight(self.scheduler.commit(scheduled), handle)
        if previous is not None:
            outputs += self._update(previous.committed, _read_back(previous.handle))
        if not self.scheduler.has_unfinished:  # every request stopped on a token just read back
            outputs += self._complete_in_flight()
        return outputs

    def _launch(self, seqs: tuple[ScheduledSeq, ...], previous: StepHandle | None = None) -> StepHandle:
        for hook in self.pre_execute_hooks:
            hook(seqs)
        return self.runner.launch(
            SchedulerOutput(seqs=seqs, token_masks=self.constraints.step_masks(seqs, self.scheduler.requests)), previous
        )

    def _update(self, committed: CommittedStep, model_output: ModelOutput) -> list[RequestOutput]:
        """Apply a step's results to the requests it ran, and build the outputs of those that changed."""
        advanced = self.scheduler.update(committed, model_output)
        return self.outputs.tokens_added(advanced, self.weight_version)

    def _complete_in_flight(self) -> list[RequestOutput]:
        flight, self._in_flight = self._in_flight, None
        return [] if flight is None else self._update(flight.committed, _read_back(flight.handle))

    def _drain(self) -> None:
        """Read back the step in flight; its outputs are returned by the next ``step()`` (or pause)."""
        self._undelivered += self._complete_in_flight()

    def _with_known_tokens(self, scheduled: SchedulerOutput) -> SchedulerOutput:
        """``scheduled``'s live sequences with their pending tokens replaced by the read-back ones."""
        seqs = []
        for seq in scheduled.seqs:
            request = self.scheduler.requests.get(seq.request_id)
            if request is None:  # it stopped on the token read back
                continue
            known = tuple(request.token_ids[seq.start_pos : seq.start_pos + seq.num_tokens])
            seqs.append(dataclasses.replace(seq, token_ids=known))
        return SchedulerOutput(seqs=tuple(seqs))

    def _retry_one_by_one(self, scheduled: SchedulerOutput, error: Exception) -> list[RequestOutput]:
        """Run each sequence of a failed step alone; fail the groups whose sequence still fails."""
        logger.warning("step of %d sequences failed (%s); retrying them one by one", len(scheduled.seqs), error)
        self.counters.num_step_retries += 1
        results: dict[str, SeqResult] = {}
        failed: list[RequestOutput] = []
        for seq in scheduled.seqs:
            request = self.scheduler.requests.get(seq.request_id)
            if request is None:  # its group failed earlier in this loop
                continue
            try:
                results.update(self._launch((seq,)).result().results)
            except EngineFatalError:
                raise
            except Exception as seq_error:
                group_id = request.parent_id or request.request_id
                logger.exception("request %s failed in the model", group_id)
                failed.append(self.fail(group_id, f"{type(seq_error).__name__}: {seq_error}"))
        # Failing a group removed all its sequences from the scheduler, including any that ran before.
        survivors = SchedulerOutput(seqs=tuple(s for s in scheduled.seqs if s.request_id in self.scheduler.requests))
        return failed + self._update(self.scheduler.commit(survivors), ModelOutput(results))


def _runner(
    config: EngineConfig,
    model: CausalLM,
    num_blocks: int,
    eos_token_id: int | None,
    world: World | None,
    workers: RankGroup | None,
) -> Runner:
    """The model in this process, or rank 0's driver over a tensor / pipeline parallel world."""
    if world is None:
        return ModelRunner(config, model, num_blocks, eos_token_id)
    from hawker.distributed.pipeline import stage_links
    from hawker.engine.driver_runner import DriverRunner

    local = ModelRunner(config, model, num_blocks, eos_token_id, stage_links(world))
    return DriverRunner(local, world, workers)


def _read_back(handle: StepHandle) -> ModelOutput:
    try:
        return handle.result()
    except Exception as error:  # the device failed after the launch: no later step can be trusted
        raise EngineFatalError(f"reading back a step's results failed: {type(error).__name__}: {error}") from error


def _can_overlap(flight: _InFlight) -> bool:
    # Penalties read every earlier token on the host, pending ones included; a
    # constraint's next mask needs the token before it.
    sampled = flight.committed.sampled
    return not any(request.sampling_params.uses_penalties or request.grammar is not None for request in sampled)
