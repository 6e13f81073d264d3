"""Llama-family decoder (Llama, Mistral); Qwen2/Qwen3 subclass it.

Q/K/V and gate/up projections are fused so a layer runs three matmuls
instead of five. Checkpoint names are Hugging Face's; ``load_weights`` maps
the unfused tensors into the fused shards.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hawker.attention.metadata import AttentionMetadata
from hawker.config import ModelConfig
from hawker.layers.activation import silu_and_mul
from hawker.layers.attention import PagedAttention
from hawker.layers.batch_invariant import RowTiler
from hawker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from hawker.layers.linear import ColumnParallelLinear, RowParallelLinear
from hawker.layers.norm import RMSNorm
from hawker.layers.parallel import PPInfo, TPInfo
from hawker.layers.rotary import RotaryAngles, RotaryEmbedding

KVCache = tuple[torch.Tensor, torch.Tensor]

# checkpoint projection name -> (fused module name, shard index)
_FUSED: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


# Modules that only some pipeline stages hold.
_STAGE_MODULES = ("model.embed_tokens", "model.norm", "lm_head")


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
        self, angles: RotaryAngles, hidden: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        tokens = hidden.shape[0]
        qk_size = (self.num_heads + self.num_kv_heads) * self.head_dim
        qk, v = self.tiler(self.qkv_proj, hidden).split([qk_size, self.num_kv_heads * self.head_dim], dim=-1)
        qk = qk.view(tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat((self.tiler(self.q_norm, q), self.tiler(self.k_norm, k)), dim=1)
        # Queries and keys are rotated together: one set of rotary ops, not two.
        q, k = angles.apply(qk).split([self.num_heads, self.num_kv_heads], dim=1)
        out = self.attn(q, k, v, kv_cache, meta)
        return self.tiler(self.o_proj, out.reshape(tokens, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPInfo) -> None:
        super().__init__()
        size = cfg.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, (size, size), False, tp, cfg.dtype)
        self.down_proj = RowParallelLinear(size, cfg.hidden_size, False, tp, cfg.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, opts: FamilyOptions, tp: TPInfo, tiler: RowTiler) -> None:
        super().__init__()
        self.tiler = tiler
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)
        self.self_attn = LlamaAttention(cfg, opts, tp, tiler)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)
        self.mlp = LlamaMLP(cfg, tp)

    def forward(
        self, angles: RotaryAngles, hidden: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(angles, self.tiler(self.input_layernorm, hidden), kv_cache, meta)
        return hidden + self.tiler(self._mlp_block, hidden)

    def _mlp_block(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.post_attention_layernorm(hidden))


class _OtherStage(nn.Module):
    """Placeholder for a decoder layer that another pipeline stage holds (keeps the layer indices)."""


class LlamaModel(nn.Module):
    def __init__(
        self, cfg: ModelConfig, opts: FamilyOptions, tp: TPInfo, pp: PPInfo, max_positions: int, tiler: RowTiler
    ) -> None:
        super().__init__()
        self.pp = pp
        self.tiler = tiler
        self.layer_range = pp.layer_range(cfg.num_layers)
        self.embed_tokens = (
            VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp, cfg.dtype) if pp.is_first else None
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, opts, tp, tiler) if i in self.layer_range else _OtherStage()
            for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype) if pp.is_last else None
        # One table for all layers (they share head_dim and theta).
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run this stage's layers; the first stage embeds ``input_ids``, later ones continue ``hidden``."""
        if self.embed_tokens is not None:
            hidden = self.embed_tokens(input_ids)
        assert hidden is not None, "a later pipeline stage needs the previous stage's hidden states"
        angles = self.rotary(positions, hidden.dtype)
        local_layers = [self.layers[i] for i in self.layer_range]
        for layer, kv_cache in zip(local_layers, kv_caches, strict=True):
            hidden = layer(angles, hidden, kv_cache, meta)
        return hidden if self.norm is None else self.tiler(self.norm, hidden)


class LlamaForCausalLM(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        tp: TPInfo | None = None,
        max_positions: int | None = None,
        pp: PPInfo | None = None,
        tiler: RowTiler | None = None,
    ) -> None:
        """``tiler``: RowTiler(16) for batch-invariant numbers (hawker/layers/batch_invariant.py)."""
        super().__init__()
        tp, pp = tp or TPInfo(), pp or PPInfo()
        self.config = cfg
        self.tiler = tiler or RowTiler()
        self.model = LlamaModel(
            cfg, self.family_options(cfg), tp, pp, max_positions or cfg.max_position_embeddings, self.tiler
        )
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp, cfg.dtype) if pp.is_last else None
        embed = self.model.embed_tokens
        if cfg.tie_word_embeddings and self.lm_head is not None and embed is not None:
            self.lm_head.weight = embed.weight

    @classmethod
    def family_options(cls, cfg: ModelConfig) -> FamilyOptions:
        return FamilyOptions(qkv_bias=cfg.attention_bias, o_bias=cfg.attention_bias)

    @property
    def num_local_layers(self) -> int:
        return len(self.model.layer_range)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta, hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self.lm_head is not None, "only the last pipeline stage computes logits"
        return self.tiler(self.lm_head.logits, hidden)

    def load_weights(self, weights: Iterable[tuple[str, Any]], require_all: bool = True) -> list[nn.Parameter]:
        """Load HF-named tensors (or lazy slices); returns the parameters written.

        ``require_all`` (loading a checkpoint) raises if a parameter is left
        unset; a weight update passes only the tensors that changed.
        """
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        written: list[nn.Parameter] = []
        for name, tensor in weights:
            found = self._resolve(name, modules)
            if found is None:
                continue
            module, module_name, param, shard = found
            module.load(param, tensor, shard)
            loaded.add(f"{module_name}.{param}#{shard}")
            written.append(getattr(module, param))
        if require_all:
            self._check_all_loaded(loaded)
        return written

    def check_weight_shapes(self, shapes: Iterable[tuple[str, Sequence[int]]]) -> list[nn.Parameter]:
        """The parameters that tensors of these (name, shape) would write.

        Raises ValueError, naming the tensor, unless every one fits a parameter of this model.
        """
        modules = dict(self.named_modules())
        targets: list[nn.Parameter] = []
        for name, shape in shapes:
            found = self._resolve(name, modules)  # raises for a name this model does not have
            if found is None:
                continue  # one this model ignores (a tied LM head, rotary tables)
            module, _, param, shard = found
            expected = tuple(getattr(module, param).shape)
            if isinstance(module, ColumnParallelLinear):  # one shard of a fused projection
                expected = (module.local_sizes[shard], *expected[1:])
            if tuple(shape) != expected:
                raise ValueError(f"{name!r} has shape {list(shape)}; this model's is {list(expected)}")
            targets.append(getattr(module, param))
        return targets

    def _resolve(self, name: str, modules: dict[str, nn.Module]) -> tuple[Any, str, str, int] | None:
        """(module, its name, parameter, shard) that checkpoint tensor ``name`` fills; None if not on this rank."""
        target = self._target(name, modules)
        if target is None:
            return None
        module_name, param = target
        prefix, _, leaf = module_name.rpartition(".")
        shard = 0
        if leaf in _FUSED:
            fused, shard = _FUSED[leaf]
            module_name = f"{prefix}.{fused}"
        module = modules.get(module_name)
        if module is None or not hasattr(module, "load") or not hasattr(module, param):
            raise ValueError(f"checkpoint tensor {name!r} does not match any parameter of {type(self).__name__}")
        return module, module_name, param, shard

    def _target(self, name: str, modules: dict[str, nn.Module]) -> tuple[str, str] | None:
        """(module, parameter) of this rank that a checkpoint tensor fills; None when nothing here uses it."""
        if "rotary_emb.inv_freq" in name:
            return None
        tied = self.config.tie_word_embeddings
        if name == "lm_head.weight" and tied:
            return None
        module_name, param = name.rsplit(".", 1)
        parts = module_name.split(".")
        if parts[:2] == ["model", "layers"] and int(parts[2]) not in self.model.layer_range:
            return None  # another pipeline stage's layer
        if module_name == "model.embed_tokens" and tied and self.model.embed_tokens is None:
            # A last stage without the embedding still needs it as its tied LM head.
            return None if self.lm_head is None else ("lm_head", param)
        if module_name in _STAGE_MODULES and module_name not in modules:
            return None  # held by another pipeline stage
        return module_name, param

    def _check_all_loaded(self, loaded: set[str]) -> None:
        expected: set[str] = set()
        for name, module in self.named_modules():
            if not hasattr(module, "load"):
                continue
            if module is self.lm_head and self.config.tie_word_embeddings and self.model.embed_tokens is not None:
                continue  # the same tensor as the embedding
            shards = len(module.local_sizes) if isinstance(module, ColumnParallelLinear) else 1
            for param_name, _ in module.named_parameters(recurse=False):
                expected.update(f"{name}.{param_name}#{s}" for s in range(shards))
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:5]}")
