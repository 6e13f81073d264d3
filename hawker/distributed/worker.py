"""A worker rank: ``python -m hawker.distributed.worker``.

Started by the driver (one process per rank on its node, told where to
meet through environment variables) or by torchrun on every node, where the
same ``hawker serve ...`` command runs on each rank and every rank but 0
turns into this loop.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from hawker.distributed.executor import serve_steps
from hawker.distributed.launch import die_with_parent
from hawker.distributed.pipeline import stage_links
from hawker.distributed.world import WorldSpec, join_world, leave_world, rank_device, share_cpu_cores
from hawker.engine.engine import EngineOptions, engine_config, eos_id, num_kv_blocks, resolve_device
from hawker.engine.model_runner import ModelRunner, build_model
from hawker.loader.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


def run_worker(options: EngineOptions, spec: WorldSpec, rank: int) -> None:
    """Join the world as ``rank``, load this rank's shard, run steps until the driver says stop."""
    device = rank_device(resolve_device(options.device), rank)
    share_cpu_cores(device, spec.world_size)
    world = join_world(spec, rank, device)
    try:
        config, checkpoint = engine_config(dataclasses.replace(options, device=device), world.parallel)
        model = build_model(config, checkpoint, world.tp_group)
        num_blocks = world.min_over_ranks(num_kv_blocks(config, model))
        # The sampler needs the same end-of-sequence id as the driver's (min_tokens).
        eos = eos_id(config.model, load_tokenizer(Path(checkpoint.path)))
        runner = ModelRunner(config, model, num_blocks, eos, stage_links(world))
        logger.info("rank %d ready: %s", rank, world.parallel)
        serve_steps(runner, world)
    finally:
        leave_world()


def main() -> None:
    logging.basicConfig(level=os.environ.get("HAWKER_LOG_LEVEL", "WARNING").upper())
    die_with_parent(int(os.environ["HAWKER_PARENT_PID"]))
    spec = WorldSpec(**json.loads(os.environ["HAWKER_WORLD"]))
    options = EngineOptions(**json.loads(os.environ["HAWKER_ENGINE_OPTIONS"]))
    run_worker(options, spec, int(os.environ["RANK"]))
    sys.exit(0)


if __name__ == "__main__":
    main()
