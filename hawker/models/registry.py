"""Architecture name -> model class, imported only when used."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from hawker.config import ModelConfig
from hawker.layers.batch_invariant import RowTiler
from hawker.layers.parallel import PPInfo, TPInfo
from hawker.models.base import CausalLM

# A family's model class, called as (config, tensor-parallel info, max positions, pipeline info, row tiler).
ModelClass = Callable[[ModelConfig, TPInfo, int, PPInfo, RowTiler], CausalLM]

# Adding a family: write models/<family>.py and add its architectures here.
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("hawker.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("hawker.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("hawker.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("hawker.models.qwen3", "Qwen3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def model_class(architecture: str) -> ModelClass:
    if architecture not in _MODELS:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(supported_architectures())}"
        )
    module_name, class_name = _MODELS[architecture]
    found: ModelClass = getattr(importlib.import_module(module_name), class_name)
    return found
