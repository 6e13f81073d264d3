"""Llama-family decoder (Llama, Mistral); Qwen2/Qwen3 subclass it.

Q/K/V and gate/up projections are fused so a layer runs three matmuls
instead of five; ``packed_modules_mapping`` tells the generic weight loading
(hawker/models/weights.py) which checkpoint tensors fill which fused shard.
The stack of layers and the LM head are hawker/models/base.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hawker.attention.backend import StepAttention
from hawker.config import ModelConfig
from hawker.layers.activation import swiglu
from hawker.layers.attention import PagedAttention
from hawker.layers.batch_invariant import RowTiler
from hawker.layers.linear import ColumnParallelLinear, RowParallelLinear
from hawker.layers.norm import RMSNorm
from hawker.layers.parallel import PPInfo, TPInfo
from hawker.layers.rotary import RotaryAngles
from hawker.models.base import CausalLM, KVCache

# checkpoint projection name -> (fused module name, shard index)
_FUSED: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


@dataclass(frozen=True)
class FamilyOptions:
    """What distinguishes the members of the family."""

    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, opts: FamilyOptions, tp: TPInfo, tiler: RowTiler) -> None:
        super().__init__()
        self.tiler = tiler
        self.num_heads = tp.shard(cfg.num_heads)
        kv_heads = tp.heads(cfg.num_kv_heads)  # replicated when fewer than the ranks
        self.num_kv_heads = kv_heads.local
        self.head_dim = cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = ColumnParallelLinear(
            cfg.hidden_size,
            (q_size, kv_size, kv_size),
            opts.qkv_bias,
            tp,
            cfg.dtype,
            shard_parts=(tp.size, kv_heads.parts, kv_heads.parts),
        )
        self.o_proj = RowParallelLinear(q_size, cfg.hidden_size, opts.o_bias, tp, cfg.dtype)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.dtype) if opts.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.dtype) if opts.qk_norm else None
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, cfg.head_dim)

    def forward(
        self, angles: RotaryAngles, hidden: torch.Tensor, kv_cache: KVCache, meta: StepAttention
    ) -> torch.Tensor:
        tokens = hidden.shape[0]
        qk_size = (self.num_heads + self.num_kv_heads) * self.head_dim
        qk, v = torch.split(self.tiler(self.qkv_proj, hidden), [qk_size, self.num_kv_heads * self.head_dim], dim=-1)
        qk = qk.view(tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = torch.split(qk, [self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat((self.tiler(self.q_norm, q), self.tiler(self.k_norm, k)), dim=1)
        # Queries and keys are rotated together: one set of rotary ops, not two.
        q, k = torch.split(angles.apply(qk), [self.num_heads, self.num_kv_heads], dim=1)
        out: torch.Tensor = self.attn(q, k, v, kv_cache, meta)
        return self.tiler(self.o_proj, out.reshape(tokens, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPInfo) -> None:
        super().__init__()
        size = cfg.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, (size, size), False, tp, cfg.dtype)
        self.down_proj = RowParallelLinear(size, cfg.hidden_size, False, tp, cfg.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(swiglu(self.gate_up_proj, x))
        return out


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, opts: FamilyOptions, tp: TPInfo, tiler: RowTiler) -> None:
        super().__init__()
        self.tiler = tiler
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)
        self.self_attn = LlamaAttention(cfg, opts, tp, tiler)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)
        self.mlp = LlamaMLP(cfg, tp)

    def forward(
        self, angles: RotaryAngles, hidden: torch.Tensor, kv_cache: KVCache, meta: StepAttention
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(angles, self.tiler(self.input_layernorm, hidden), kv_cache, meta)
        return hidden + self.tiler(self._mlp_block, hidden)

    def _mlp_block(self, hidden: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.mlp(self.post_attention_layernorm(hidden))
        return out


class LlamaForCausalLM(CausalLM):
    packed_modules_mapping = _FUSED

    def __init__(
        self,
        cfg: ModelConfig,
        tp: TPInfo | None = None,
        max_positions: int | None = None,
        pp: PPInfo | None = None,
        tiler: RowTiler | None = None,
    ) -> None:
        """``tiler``: RowTiler(16) for batch-invariant numbers (hawker/layers/batch_invariant.py)."""
        opts = self.family_options(cfg)
        super().__init__(cfg, tp, max_positions, pp, tiler, lambda tp, tiler: LlamaDecoderLayer(cfg, opts, tp, tiler))

    @classmethod
    def family_options(cls, cfg: ModelConfig) -> FamilyOptions:
        return FamilyOptions(qkv_bias=cfg.attention_bias, o_bias=cfg.attention_bias)
