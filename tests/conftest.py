"""Shared fixtures: tiny random-weight checkpoints of each supported architecture."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tests.tiny_models import ARCHITECTURES, build_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    return {arch: build_tiny_checkpoint(arch, root / arch) for arch in ARCHITECTURES}
