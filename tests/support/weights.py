"""A trainer's step for the weight-update tests: the reference model's weights moved, saved as safetensors."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tests.support.tiny_models import load_reference


def perturbed_weights(directory: Path, target: Path, only: str | None = None) -> dict[str, torch.Tensor]:
    """A trainer's step: the reference model with every (or only ``only``'s) weight moved; saved to ``target``."""
    model = load_reference(directory)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if only is None or only in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(target, safe_serialization=True)
    for extra in directory.iterdir():  # the tokenizer, so that the trained copy loads on its own too
        if not (target / extra.name).exists():
            shutil.copy(extra, target / extra.name)
    state = model.state_dict()
    return {name: t for name, t in state.items() if only is None or only in name}
