"""Building an engine's parts: a rank's model shard, its tokenizer and the size of its KV pool."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from hawker.config import EngineConfig, ModelConfig
from hawker.engine.compiled_decode import scratch_blocks
from hawker.engine.configure import engine_config, resolve_device, world_shape
from hawker.engine.errors import EngineFatalError
from hawker.engine.memory_profile import profile_num_blocks
from hawker.layers.batch_invariant import DEFAULT_TILE_ROWS, RowTiler
from hawker.layers.parallel import PPInfo, TPInfo
from hawker.layers.projection import plan_projections
from hawker.loader.checkpoint import Checkpoint
from hawker.loader.tokenizer import load_tokenizer
from hawker.models.base import CausalLM
from hawker.models.registry import model_class
from hawker.options import EngineOptions

# How often rank 0 checks on the other ranks while it waits for them to join.
RANK_WATCH_S = 0.2

if TYPE_CHECKING:
    from hawker.distributed.launch import RankGroup
    from hawker.distributed.world import World, WorldSpec


def build_model(config: EngineConfig, checkpoint: Checkpoint, tp_group: Any = None) -> CausalLM:
    """This rank's shard of the model: its tensor-parallel slice of its pipeline stage's layers."""
    cls = model_class(config.model.architecture)
    parallel = config.parallel
    tp = TPInfo(parallel.tensor_parallel_rank, parallel.tensor_parallel_size, tp_group, parallel.tp_overlap_chunks)
    pp = PPInfo(parallel.pipeline_parallel_rank, parallel.pipeline_parallel_size)
    max_positions = max(config.scheduler.max_model_len, config.model.max_position_embeddings)
    tiler = RowTiler(DEFAULT_TILE_ROWS if config.batch_invariant else 0)
    with torch.device(config.device):
        model = cls(config.model, tp, max_positions, pp, tiler)
    model.load_weights(checkpoint.weights())
    if config.matmul is not None:
        plan_projections(model, config.matmul)
    return model.eval()


@dataclass(frozen=True)
class RankShard:
    """What one rank of a tensor x pipeline world loaded: its groups, config, model shard and tokenizer."""

    world: World
    config: EngineConfig
    model: CausalLM
    tokenizer: PreTrainedTokenizerBase
    threads_before: int  # torch's thread count before the ranks shared the cores


def load_rank_shard(options: EngineOptions, spec: WorldSpec, rank: int, ranks_here: int) -> RankShard:
    """Join the world at ``spec`` as ``rank`` and load this rank's shard (the driver and every worker);
    ``ranks_here``: how many of the world's ranks share this machine's cores."""
    from hawker.distributed import world  # torch.distributed set-up only when asked for

    device = world.rank_device(resolve_device(options.device), rank)
    threads_before = world.share_cpu_cores(device, ranks_here)
    joined = world.join_world(spec, rank, device)
    try:
        config, checkpoint = engine_config(dataclasses.replace(options, device=device), joined.parallel)
        model = build_model(config, checkpoint, joined.tp_group)
        return RankShard(joined, config, model, load_tokenizer(Path(checkpoint.path)), threads_before)
    except BaseException:
        world.leave_world()
        raise


def start_driver(options: EngineOptions) -> tuple[RankShard, RankGroup | None]:
    """Rank 0 of a tensor x pipeline world: start the other ranks (processes on this node, or Ray
    actors) or join them under torchrun, and load rank 0's shard; returns it with the ranks it started."""
    from hawker.distributed import launch, world  # torch.distributed set-up only when asked for

    shape = world_shape(options)
    found = launch.torchrun_rank(shape)
    if found is not None and options.distributed_executor_backend == "ray":
        raise ValueError("torchrun started these ranks already: drop --distributed-executor-backend ray")
    ranks: RankGroup | None = None
    if found is not None:
        spec, rank = found
        if rank != 0:
            raise ValueError("only rank 0 builds the engine; other ranks run hawker.engine.worker")
        ranks_here = launch.ranks_on_this_node(spec.world_size)
    elif options.distributed_executor_backend == "ray":
        from hawker.distributed.ray_executor import RayRanks  # ray is an optional extra
        from hawker.engine.worker import RayRankActor

        ray_ranks = RayRanks(shape, dataclasses.asdict(options), options.ray_address, options.device, RayRankActor)
        ranks, spec, rank, ranks_here = ray_ranks, ray_ranks.spec, 0, ray_ranks.ranks_on_driver_node
    else:
        spec = world.WorldSpec("127.0.0.1", launch.free_port(), **shape)
        ranks = launch.WorkerProcesses(spec, dataclasses.asdict(options))
        rank, ranks_here = 0, spec.world_size
    try:
        return load_watching(ranks, lambda: load_rank_shard(options, spec, rank, ranks_here)), ranks
    except BaseException:
        if ranks is not None:
            ranks.kill()
        raise


def load_watching(ranks: RankGroup | None, load: Callable[[], RankShard]) -> RankShard:
    """``load()`` on a helper thread while the ranks started here are watched.

    Rank 0's load waits in ``init_process_group`` until every rank has
    joined; a rank that died before joining (an import error on a Ray node,
    out of memory) would leave it waiting for the whole step timeout. The
    waiting thread is left behind (a daemon) when that happens.
    """
    if ranks is None:
        return load()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["shard"] = load()
        except BaseException as error:  # handed to the caller below
            outcome["error"] = error

    loading = threading.Thread(target=run, name="hawker-rank0-load", daemon=True)
    loading.start()
    while loading.is_alive():
        loading.join(RANK_WATCH_S)
        reason = ranks.dead()
        if reason is not None and loading.is_alive():
            raise EngineFatalError(f"a worker rank died while the engine started: {reason}")
    if "error" in outcome:
        raise outcome["error"]
    shard: RankShard = outcome["shard"]
    return shard


def warm_up_blocks(config: EngineConfig) -> int:
    """KV blocks a background compile's dummy steps write to (kept out of the pool)."""
    rows = config.compile_decode_max_rows
    return scratch_blocks(rows, config.cache.block_size) if rows and config.compile_warmup == "background" else 0


def num_kv_blocks(config: EngineConfig, model: CausalLM) -> int:
    if config.cache.sized_by_profiling:
        return profile_num_blocks(config, model, config.cache.gpu_memory_utilization)
    parallel = config.parallel
    return config.cache.blocks_for(config.model, parallel.tensor_parallel_size, parallel.pipeline_parallel_size)


def eos_id(model: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> int | None:
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.eos_token_id
