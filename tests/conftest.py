"""Shared fixtures: tiny random-weight checkpoints of each supported architecture."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Engines run eagerly in tests (compiling each one would take most of the
# time budget); tests/engine/test_compiled_decode.py turns compilation back on.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
# Every engine zeroes its whole KV pool when it is built (2 GB by default on a CPU): with the suite's
# engines alive together that exhausted memory, and a build took seconds in the zeroing alone. A
# quarter GB holds ~11k tokens of the default model and far more of the tiny ones; tests that need a
# given pool size ask for it.
os.environ.setdefault("HAWKER_CPU_KV_CACHE_GB", "0.25")

import torch

# Without a GPU, Triton kernels run in Triton's interpreter (read when a
# kernel module is first imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hawker.layers.quant import INT4_GROUP_SIZE
from tests.support.tiny_models import ARCHITECTURES, build_tiny_checkpoint, rewritten_copy, snap_to_grid


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    return {arch: build_tiny_checkpoint(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def grid_checkpoint(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with every 2-D projection and the (tied) embedding snapped to a 4-bit grid."""

    def snap(name: str, tensor: torch.Tensor) -> torch.Tensor:
        return snap_to_grid(tensor) if tensor.dim() == 2 and tensor.shape[1] % INT4_GROUP_SIZE == 0 else tensor

    return rewritten_copy(tiny_checkpoints["llama"], tmp_path_factory.mktemp("int4") / "llama", snap)


@pytest.fixture(scope="session")
def trained_llama(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama after a 'training step': every tensor moved, so its greedy outputs differ (weight updates)."""
    generator = torch.Generator().manual_seed(7)

    def step(name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor + 0.05 * torch.randn(tensor.shape, generator=generator)

    return rewritten_copy(tiny_checkpoints["llama"], tmp_path_factory.mktemp("trained") / "llama", step)
