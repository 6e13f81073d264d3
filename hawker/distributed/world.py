"""Process groups of a tensor x pipeline grid, and the messages the driver sends each step."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from hawker.config import ParallelConfig
from hawker.step import SchedulerOutput

# Collectives inside a step (all-reduce, hidden-state transfers) finish in
# milliseconds; a rank that waits this long is stuck, and failing beats hanging.
STEP_TIMEOUT = datetime.timedelta(seconds=120)
# Workers wait for the driver's next step for as long as the server is idle.
CONTROL_TIMEOUT = datetime.timedelta(days=30)


@dataclass(frozen=True)
class RunStep:
    step: SchedulerOutput
    want_logits: bool  # the driver observes logits (tests): return them with the output


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class UpdateWeights:
    """New weight values for every rank: full (HF name, CPU tensor) pairs, each rank loading its own
    shard, or a directory of safetensors that every rank can read."""

    weights: list[tuple[str, torch.Tensor]] | str


Message = RunStep | Shutdown | UpdateWeights


@dataclass(frozen=True)
class WorldSpec:
    """Where the ranks meet and how the grid is laid out."""

    master_addr: str
    master_port: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    tp_overlap_chunks: int = 1

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def parallel_config(self, rank: int) -> ParallelConfig:
        pp_rank, tp_rank = divmod(rank, self.tensor_parallel_size)
        return ParallelConfig(
            tensor_parallel_size=self.tensor_parallel_size,
            tensor_parallel_rank=tp_rank,
            pipeline_parallel_size=self.pipeline_parallel_size,
            pipeline_parallel_rank=pp_rank,
            tp_overlap_chunks=self.tp_overlap_chunks,
        )


@dataclass(frozen=True)
class World:
    """This process's groups once the ranks have met."""

    rank: int
    parallel: ParallelConfig
    tp_group: Any = field(repr=False)
    # gloo over every rank, for pickled messages (NCCL moves only device tensors).
    control_group: Any = field(repr=False)

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    @property
    def size(self) -> int:
        return self.parallel.world_size

    def stage_rank(self, stage: int) -> int:
        """Global rank of this rank's tensor-parallel peer in pipeline stage ``stage``."""
        return stage * self.parallel.tensor_parallel_size + self.parallel.tensor_parallel_rank

    @property
    def result_rank(self) -> int:
        """The rank that samples: first tensor-parallel rank of the last stage."""
        return (self.parallel.pipeline_parallel_size - 1) * self.parallel.tensor_parallel_size

    def broadcast(self, message: Message | None) -> Message:
        """The driver sends ``message``; every other rank receives it."""
        box = [message]
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        received = box[0]
        assert isinstance(received, RunStep | Shutdown | UpdateWeights)
        return received

    def min_over_ranks(self, value: int) -> int:
        tensor = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.control_group)
        return int(tensor.item())

    def max_over_ranks(self, value: int) -> int:
        return -self.min_over_ranks(-value)


def device_backend(device: str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def join_world(spec: WorldSpec, rank: int, device: str) -> World:
    """Meet the other ranks at ``spec``'s address; builds the same groups on every rank."""
    dist.init_process_group(
        backend=device_backend(device),
        init_method=f"tcp://{spec.master_addr}:{spec.master_port}",
        rank=rank,
        world_size=spec.world_size,
        timeout=STEP_TIMEOUT,
    )
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    tp_group = None
    tp = spec.tensor_parallel_size
    # Every rank creates every stage's group, in the same order (torch requires it).
    for stage in range(spec.pipeline_parallel_size):
        group = dist.new_group(ranks=list(range(stage * tp, (stage + 1) * tp)), timeout=STEP_TIMEOUT)
        if stage == rank // tp:
            tp_group = group
    return World(rank=rank, parallel=spec.parallel_config(rank), tp_group=tp_group, control_group=control)


def leave_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: str, rank: int) -> str:
    """Each rank of a node takes its own GPU (LOCAL_RANK under torchrun); CPU ranks share the CPU."""
    parsed = torch.device(device)
    if parsed.type != "cuda" or parsed.index is not None:
        return device
    local = int(os.environ.get("LOCAL_RANK", rank))
    return f"cuda:{local % max(1, torch.cuda.device_count())}"


def share_cpu_cores(device: str, ranks_here: int) -> int:
    """On a CPU, give each of the ``ranks_here`` ranks on this machine an equal share of its cores;
    returns the previous thread count.

    Ranks that each used every core would fight over them and stall in collectives.
    """
    previous = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_here))
    return previous
