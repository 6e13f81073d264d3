"""Qwen2: the Llama block with biases on the Q/K/V projections."""

from __future__ import annotations

from hawker.config import ModelConfig
from hawker.models.llama import FamilyOptions, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def family_options(cls, cfg: ModelConfig) -> FamilyOptions:
        return FamilyOptions(qkv_bias=True, o_bias=False)
