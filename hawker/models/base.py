"""What every decoder-only family shares: the stack of layers split over pipeline stages, and the LM head.

A family file (hawker/models/llama.py) defines its decoder layer and passes
a factory for it; ``CausalLM`` builds the embedding (first stage), the
layers this stage holds (placeholders for the others, so that indices and
checkpoint names stay the same), the final norm and LM head (last stage),
and loads checkpoint weights generically (hawker/models/weights.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hawker.attention.backend import StepAttention
from hawker.config import ModelConfig
from hawker.layers.batch_invariant import RowTiler
from hawker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from hawker.layers.norm import RMSNorm
from hawker.layers.parallel import PPInfo, TPInfo
from hawker.layers.rotary import RotaryEmbedding
from hawker.models.weights import CheckpointWeights

KVCache = tuple[torch.Tensor, torch.Tensor]


class OtherStage(nn.Module):
    """Placeholder for a decoder layer that another pipeline stage holds (keeps the layer indices)."""


class DecoderModel(nn.Module):
    """Embedding, decoder layers and final norm: the ``model.*`` part of a checkpoint."""

    def __init__(
        self,
        cfg: ModelConfig,
        tp: TPInfo,
        pp: PPInfo,
        max_positions: int,
        tiler: RowTiler,
        make_layer: Callable[[], nn.Module],
    ) -> None:
        super().__init__()
        self.tiler = tiler
        self.layer_range = pp.layer_range(cfg.num_layers)
        self.embed_tokens = (
            VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp, cfg.dtype) if pp.is_first else None
        )
        self.layers = nn.ModuleList(
            make_layer() if i in self.layer_range else OtherStage() for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype) if pp.is_last else None
        # One table for all layers (they share head_dim and theta).
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: StepAttention,
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


class CausalLM(CheckpointWeights):
    """A decoder stack with an LM head; ``make_layer`` builds one decoder layer of the family."""

    def __init__(
        self,
        cfg: ModelConfig,
        tp: TPInfo | None,
        max_positions: int | None,
        pp: PPInfo | None,
        tiler: RowTiler | None,
        make_layer: Callable[[TPInfo, RowTiler], nn.Module],
    ) -> None:
        super().__init__()
        tp, pp = tp or TPInfo(), pp or PPInfo()
        self.config = cfg
        self.tiler = tiler or RowTiler()
        positions = max_positions or cfg.max_position_embeddings
        self.model = DecoderModel(cfg, tp, pp, positions, self.tiler, lambda: make_layer(tp, self.tiler))
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp, cfg.dtype) if pp.is_last else None
        embed = self.model.embed_tokens
        if cfg.tie_word_embeddings and self.lm_head is not None and embed is not None:
            self.lm_head.weight = embed.weight

    @property
    def num_local_layers(self) -> int:
        return len(self.model.layer_range)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: StepAttention,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out: torch.Tensor = self.model(input_ids, positions, kv_caches, meta, hidden)
        return out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self.lm_head is not None, "only the last pipeline stage computes logits"
        return self.tiler(self.lm_head.logits, hidden)
