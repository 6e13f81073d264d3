"""Size the KV cache from the device memory left after a worst-case step.

On a GPU the KV pool should take whatever the weights and the largest
step's activations leave of ``gpu_memory_utilization`` of the device. The
largest step is measured, not estimated: one forward + sampling of a full
token budget spread over as many sequences as a step may hold, with the
peak of torch's allocator read afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hawker.config import EngineConfig, bytes_per_kv_block
from hawker.engine.model_runner import ModelRunner
from hawker.models.base import CausalLM
from hawker.sampling_params import SamplingParams
from hawker.step import ScheduledSeq, SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceMemory:
    """Device memory in bytes, read right after the worst-case step."""

    total: int
    free: int
    torch_reserved: int  # held by torch's caching allocator
    torch_peak: int  # the most torch had allocated at once since the step began (weights included)


def kv_cache_budget(memory: DeviceMemory, utilization: float) -> int:
    """Bytes the KV pool may take so that the process stays within ``utilization`` of the device."""
    # Memory in use that torch's allocator does not see: the CUDA context,
    # communication buffers, other libraries.
    outside_torch = max(0, memory.total - memory.free - memory.torch_reserved)
    budget = int(memory.total * utilization) - memory.torch_peak - outside_torch
    if budget <= 0:
        raise ValueError(
            f"no device memory is left for the KV cache: gpu_memory_utilization {utilization} allows "
            f"{memory.total * utilization / 2**30:.2f} GiB, the weights and the largest step's activations "
            f"peak at {memory.torch_peak / 2**30:.2f} GiB and {outside_torch / 2**30:.2f} GiB is used outside "
            "torch; raise gpu_memory_utilization or lower max_num_batched_tokens"
        )
    return budget


def worst_case_step(config: EngineConfig) -> tuple[SchedulerOutput, int]:
    """The largest step the scheduler can emit: a full token budget of prefills, each sampled.

    Returns the step and the number of KV blocks it writes to.
    """
    sched = config.scheduler
    block_size = config.cache.block_size
    num_seqs = min(sched.max_num_seqs, sched.max_num_batched_tokens)
    longest = sched.max_model_len - 1
    params = SamplingParams(max_tokens=1)
    seqs: list[ScheduledSeq] = []
    remaining = sched.max_num_batched_tokens
    next_block = 0
    for index in range(num_seqs):
        length = min(longest, -(-remaining // (num_seqs - index)))
        if length <= 0:
            break
        blocks = -(-length // block_size)
        table = tuple(range(next_block, next_block + blocks))
        next_block += blocks
        remaining -= length
        seqs.append(ScheduledSeq(f"warm-up-{index}", (0,) * length, 0, table, True, params, 0, 0, length))
    return SchedulerOutput(seqs=tuple(seqs)), next_block


def read_cuda_memory(device: torch.device) -> DeviceMemory:
    free, total = torch.cuda.mem_get_info(device)
    return DeviceMemory(
        total=total,
        free=free,
        torch_reserved=torch.cuda.memory_reserved(device),
        torch_peak=torch.cuda.max_memory_allocated(device),
    )


def profile_num_blocks(
    config: EngineConfig,
    model: CausalLM,
    utilization: float,
    read_memory: Callable[[torch.device], DeviceMemory] = read_cuda_memory,
) -> int:
    """KV blocks that fit in ``utilization`` of the device after the worst-case step of ``model``."""
    device = torch.device(config.device)
    step, blocks = worst_case_step(config)
    # A plain eager runner with just the blocks the step writes to.
    plain = dataclasses.replace(config, compile_decode_max_rows=0, cuda_graph_max_batch_size=0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    runner = ModelRunner(plain, model, blocks, eos_token_id=None)
    runner.execute(step)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    memory = read_memory(device)
    del runner
    if device.type == "cuda":
        torch.cuda.empty_cache()
    budget = kv_cache_budget(memory, utilization)
    num_blocks = budget // bytes_per_kv_block(config.model, config.cache, config.parallel.tensor_parallel_size)
    logger.info(
        "KV cache: %.2f GiB of %.2f GiB (utilization %.2f, peak of weights + worst-case step %.2f GiB): %d blocks",
        budget / 2**30,
        memory.total / 2**30,
        utilization,
        memory.torch_peak / 2**30,
        num_blocks,
    )
    return int(num_blocks)
