"""A worker rank: ``python -m hawker.engine.worker``.

Started by the driver (one process per rank on its node, told where to
meet through environment variables), by torchrun on every node, where the
same ``hawker serve ...`` command runs on each rank and every rank but 0
turns into this loop, or as a Ray actor (hawker/distributed/ray_executor.py),
which calls ``run_worker``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import torch

from hawker.distributed.launch import die_with_parent
from hawker.distributed.pipeline import stage_links
from hawker.distributed.world import WorldSpec, leave_world
from hawker.engine.driver_runner import serve_steps
from hawker.engine.loading import eos_id, load_rank_shard, num_kv_blocks
from hawker.engine.model_runner import ModelRunner
from hawker.options import EngineOptions

logger = logging.getLogger(__name__)


def run_worker(options: EngineOptions, spec: WorldSpec, rank: int, ranks_here: int) -> None:
    """Join the world as ``rank``, load this rank's shard, run steps until the driver says stop.

    ``ranks_here``: how many of the world's ranks share this machine's cores.
    """
    shard = load_rank_shard(options, spec, rank, ranks_here)
    try:
        config, world = shard.config, shard.world
        num_blocks = world.min_over_ranks(num_kv_blocks(config, shard.model))
        # The sampler needs the same end-of-sequence id as the driver's (min_tokens).
        runner = ModelRunner(config, shard.model, num_blocks, eos_id(config.model, shard.tokenizer), stage_links(world))
        logger.info("rank %d ready: %s", rank, world.parallel)
        serve_steps(runner, world)
    finally:
        leave_world()


class RayRankActor:
    """One of ranks 1..N-1 inside a Ray actor (the ray executor: hawker/distributed/ray_executor.py)."""

    def run(self, options: dict[str, Any], spec: dict[str, Any], rank: int, ranks_here: int) -> None:
        if torch.device(options["device"]).type == "cuda":
            os.environ["LOCAL_RANK"] = "0"  # Ray shows this actor its one GPU, as cuda:0
        run_worker(EngineOptions(**options), WorldSpec(**spec), rank, ranks_here)


def main() -> None:
    logging.basicConfig(level=os.environ.get("HAWKER_LOG_LEVEL", "WARNING").upper())
    die_with_parent(int(os.environ["HAWKER_PARENT_PID"]))
    spec = WorldSpec(**json.loads(os.environ["HAWKER_WORLD"]))
    options = EngineOptions(**json.loads(os.environ["HAWKER_ENGINE_OPTIONS"]))
    run_worker(options, spec, int(os.environ["RANK"]), spec.world_size)  # the driver starts every rank here
    sys.exit(0)


if __name__ == "__main__":
    main()
