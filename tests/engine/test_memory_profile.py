"""KV cache sizing from device memory after a worst-case step."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from hawker import LLM
from hawker.config import bytes_per_kv_block
from hawker.engine.engine import Engine
from hawker.engine.memory_profile import DeviceMemory, kv_cache_budget, profile_num_blocks, worst_case_step

GIB = 2**30


def test_budget_takes_what_the_peak_and_outside_use_leave() -> None:
    # 80 GiB device, 4 GiB free, torch reserved 75 GiB -> 1 GiB outside torch.
    memory = DeviceMemory(total=80 * GIB, free=4 * GIB, torch_reserved=75 * GIB, torch_peak=20 * GIB)
    assert kv_cache_budget(memory, 0.9) == int(80 * GIB * 0.9) - 20 * GIB - 1 * GIB


def test_budget_refuses_when_nothing_is_left() -> None:
    memory = DeviceMemory(total=10 * GIB, free=1 * GIB, torch_reserved=9 * GIB, torch_peak=9 * GIB)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        kv_cache_budget(memory, 0.9)


def _engine(checkpoint: Path, **options: object) -> Engine:
    return LLM(str(checkpoint), dtype="float32", num_kv_blocks=8, **options).engine


@pytest.mark.parametrize(("budget", "max_seqs", "max_len"), [(64, 4, 200), (100, 8, 10), (7, 128, 64)])
def test_worst_case_step_fills_the_budget(
    tiny_checkpoints: dict[str, Path], budget: int, max_seqs: int, max_len: int
) -> None:
    engine = _engine(
        tiny_checkpoints["llama"], max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=max_len
    )
    step, blocks = worst_case_step(engine.config)
    lengths = [seq.num_tokens for seq in step.seqs]
    assert sum(lengths) == min(budget, max_seqs * (max_len - 1))
    assert len(lengths) <= max_seqs and max(lengths) <= max_len - 1
    used = [b for seq in step.seqs for b in seq.block_table]
    assert sorted(used) == list(range(blocks))  # distinct blocks, all of them written
    assert all(seq.sample for seq in step.seqs)


def test_profile_runs_the_step_and_sizes_the_pool(tiny_checkpoints: dict[str, Path]) -> None:
    engine = _engine(tiny_checkpoints["llama"], max_num_batched_tokens=64, max_num_seqs=4)
    config = dataclasses.replace(
        engine.config, cache=dataclasses.replace(engine.config.cache, kv_cache_memory_bytes=None, num_blocks=None)
    )
    assert config.cache.sized_by_profiling
    reads: list[torch.device] = []

    def fake_memory(device: torch.device) -> DeviceMemory:
        reads.append(device)
        return DeviceMemory(total=GIB, free=GIB // 2, torch_reserved=GIB // 4, torch_peak=GIB // 8)

    blocks = profile_num_blocks(config, engine.runner.model, 0.5, read_memory=fake_memory)
    expected_bytes = GIB // 2 - GIB // 8 - GIB // 4
    assert blocks == expected_bytes // bytes_per_kv_block(config.model, config.cache)
    assert reads == [torch.device("cpu")]
