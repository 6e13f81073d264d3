"""Pipeline stages: which ranks a stage talks to, and how a step is cut into micro-batches.

A step's sequences are cut into micro-batches of similar token counts. Stage
``s`` runs micro-batch ``i``, hands its hidden states to stage ``s+1``
without waiting (``isend``) and goes on with micro-batch ``i+1``, so all
stages work at once after the first micro-batch has gone through.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hawker.step import ScheduledSeq

if TYPE_CHECKING:
    from hawker.distributed.world import World


@dataclass(frozen=True)
class StageLinks:
    previous_rank: int | None  # sends this stage its input hidden states; None on the first stage
    next_rank: int | None  # receives this stage's output; None on the last stage
    micro_batches: int


def split_micro_batches(seqs: Sequence[ScheduledSeq], count: int) -> list[tuple[ScheduledSeq, ...]]:
    """Cut ``seqs`` (in order) into at most ``count`` non-empty runs of about equal token counts."""
    total = sum(seq.num_tokens for seq in seqs)
    runs: list[tuple[ScheduledSeq, ...]] = []
    current: list[ScheduledSeq] = []
    done = 0
    for seq in seqs:
        current.append(seq)
        done += seq.num_tokens
        # Close a run once it reaches its share of the tokens (the last run takes the rest).
        if len(runs) < count - 1 and done * count >= total * (len(runs) + 1):
            runs.append(tuple(current))
            current = []
    if current:
        runs.append(tuple(current))
    return runs


def stage_links(world: World) -> StageLinks | None:
    """This rank's neighbours in the pipeline (None without pipeline parallelism)."""
    parallel = world.parallel
    stages = parallel.pipeline_parallel_size
    if stages == 1:
        return None
    stage = parallel.pipeline_parallel_rank
    return StageLinks(
        previous_rank=world.stage_rank(stage - 1) if stage > 0 else None,
        next_rank=world.stage_rank(stage + 1) if stage < stages - 1 else None,
        micro_batches=stages,
    )
