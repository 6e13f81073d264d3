"""Qwen3: the Llama block with per-head RMSNorm on queries and keys."""

from __future__ import annotations

from hawker.config import ModelConfig
from hawker.models.llama import FamilyOptions, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def family_options(cls, cfg: ModelConfig) -> FamilyOptions:
        return FamilyOptions(qkv_bias=cfg.attention_bias, o_bias=cfg.attention_bias, qk_norm=True)
