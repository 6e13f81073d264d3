"""Rank 0's runner over a tensor / pipeline parallel world, and the other ranks' step loop."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hawker.distributed.launch import RankGroup
from hawker.distributed.world import RunStep, Shutdown, UpdateWeights, World, leave_world
from hawker.engine.errors import EngineFatalError
from hawker.engine.model_runner import ModelRunner
from hawker.engine.runner import LogitsObserver, WeightSource
from hawker.step import CompletedStep, ModelOutput, SchedulerOutput, StepHandle

logger = logging.getLogger(__name__)

# After a step's collective failed, how long to wait for a rank's death to show (a process's exit
# code, a Ray actor's death notice) so that the error can name it.
DEATH_NEWS_S = 3.0
DEATH_POLL_S = 0.05
# What the sampling rank returns to the driver: the output and, when asked, the logits it saw.
ObservedLogits = list[tuple[list[str], torch.Tensor]]


class DriverRunner:
    """Broadcasts each step to every rank, runs rank 0's shard, and returns the sampled tokens.

    Any failure inside a step is fatal: the ranks would no longer agree on
    which step they are in. Each step runs to completion when launched
    (overlap scheduling is for one process). Weight updates go to every
    rank; sleep is not supported across ranks yet.
    """

    def __init__(self, local: ModelRunner, world: World, workers: RankGroup | None) -> None:
        self.local = local
        self.world = world
        self.workers = workers
        self._observer: LogitsObserver | None = None
        self._closed = False

    @property
    def logits_observer(self) -> LogitsObserver | None:
        return self._observer

    @logits_observer.setter
    def logits_observer(self, observer: LogitsObserver | None) -> None:
        self._observer = observer
        self.local.logits_observer = observer  # rank 0 samples itself without pipeline stages

    def check_health(self, patience_s: float = 0.0) -> None:
        """Raise if a rank has died; ``patience_s``: how long to wait for the news of a death (after a
        failed collective, the rank's exit can take a moment to show)."""
        deadline = time.monotonic() + patience_s
        while self.workers is not None:
            reason = self.workers.dead()
            if reason is not None:
                raise EngineFatalError(f"a worker rank died: {reason}")
            if time.monotonic() >= deadline:
                return
            time.sleep(DEATH_POLL_S)

    @property
    def warming_up(self) -> bool:
        return False  # no compiled step: collectives are not traced

    def launch(self, step: SchedulerOutput, previous: StepHandle | None = None) -> StepHandle:
        assert previous is None, "overlap scheduling runs in one process"
        return CompletedStep(self.execute(step))

    def update_weights(self, weights: WeightSource) -> int:
        """Every rank takes the new values, each loading its own shard of the full tensors.

        Two rounds: every rank checks the update (names, shapes, layers kept
        as quantised copies), and only if none refused does every rank write
        it; a refused update changes nothing on any rank.
        """
        self.check_health()
        shared: list[tuple[str, torch.Tensor]] | str
        if isinstance(weights, str | Path):
            shared = str(weights)
        else:
            shared = [(name, torch.as_tensor(tensor).detach().cpu()) for name, tensor in weights]
        refusal: ValueError | None = None
        written = 0
        try:
            self.world.broadcast(UpdateWeights(shared))
            try:
                self.local.check_weights(shared)
            except ValueError as error:
                refusal = error
            refused_anywhere = self.world.max_over_ranks(int(refusal is not None))
            if not refused_anywhere:
                written = self.local.update_weights(shared)
        except Exception as error:
            self.check_health(DEATH_NEWS_S)
            raise EngineFatalError(f"a distributed weight update failed: {type(error).__name__}: {error}") from error
        if refusal is not None:
            raise refusal
        if refused_anywhere:
            raise ValueError("another rank refused the weight update (its log says why); nothing was written")
        return written

    def release_memory(self, weights: bool) -> None:
        raise ValueError("sleep is not supported with tensor or pipeline parallelism yet")

    def restore_memory(self, checkpoint_path: str | None) -> None:
        raise ValueError("sleep is not supported with tensor or pipeline parallelism yet")

    def execute(self, step: SchedulerOutput) -> ModelOutput:
        self.check_health()
        try:
            self.world.broadcast(RunStep(step, want_logits=self._observer is not None))
            output = self.local.execute(step)
            observed: ObservedLogits = []
            if self.world.result_rank != 0:
                box: list[object] = [None]
                dist.recv_object_list(box, src=self.world.result_rank, group=self.world.control_group)
                output, observed = box[0]  # type: ignore[misc]
        except Exception as error:
            self.check_health(DEATH_NEWS_S)  # a dead worker is the likelier cause: say so
            raise EngineFatalError(f"a distributed step failed: {type(error).__name__}: {error}") from error
        assert output is not None
        if self._observer is not None:
            for ids, logits in observed:
                self._observer(ids, logits)
        return output

    def shutdown(self) -> None:
        """Tell every rank to exit, wait for the workers, leave the process groups."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.workers is None or self.workers.dead() is None:
                self.world.broadcast(Shutdown())
        except Exception as error:  # a rank is gone already; kill what is left
            logger.warning("could not tell the workers to exit (%s)", error)
            if self.workers is not None:
                self.workers.kill()
        if self.workers is not None:
            self.workers.stop()
        leave_world()


def serve_steps(runner: ModelRunner, world: World) -> None:
    """A worker rank's loop: run each step the driver broadcasts until it says Shutdown."""
    while True:
        message = world.broadcast(None)
        if isinstance(message, Shutdown):
            return
        if isinstance(message, UpdateWeights):
            _update_weights(runner, world, message)
            continue
        observed: ObservedLogits = []
        runner.logits_observer = _collector(observed) if message.want_logits else None
        output = runner.execute(message.step)
        if world.rank == world.result_rank:
            dist.send_object_list([(output, observed)], dst=0, group=world.control_group)


def _update_weights(runner: ModelRunner, world: World, message: UpdateWeights) -> None:
    """A worker's part of a weight update: check it, learn whether any rank refused, write if none did."""
    refused = False
    try:
        runner.check_weights(message.weights)
    except ValueError as error:  # the driver reports the refusal to its caller
        logger.warning("rank %d refused a weight update: %s", world.rank, error)
        refused = True
    if not world.max_over_ranks(int(refused)):
        runner.update_weights(message.weights)


def _collector(observed: ObservedLogits) -> LogitsObserver:
    return lambda ids, logits: observed.append((ids, logits.cpu()))
