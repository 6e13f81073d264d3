"""The attention-backend interface: build a step's metadata once, then every layer attends with it.

A backend turns the step's sequences (in row order, decodes first) into a
metadata value; each attention layer calls ``attend`` on that value with its
queries, new keys and values and its slice of the paged KV cache. The model
never asks which backend it runs: ``torch`` (hawker/attention/torch_metadata.py
+ torch_backend.py, CPU and the reference) and ``triton``
(hawker/attention/triton_backend.py, GPUs) both have this shape. Replaying a
captured step (compiled CPU decode, CUDA graphs) works on the same metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from hawker.config import EngineConfig


class SeqRun(Protocol):
    """One sequence's part of a step: ``num_tokens`` queries after ``start_pos`` cached tokens."""

    @property
    def start_pos(self) -> int: ...

    @property
    def num_tokens(self) -> int: ...

    @property
    def block_table(self) -> Sequence[int]: ...


class StepAttention(Protocol):
    """A step's attention metadata, shared by every layer."""

    @property
    def slot_mapping(self) -> torch.Tensor:
        """[T] cache slot of each token row."""
        ...

    @property
    def num_decodes(self) -> int:
        """The first rows, one token each."""
        ...

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Write this step's keys and values into the cache, then attend: q [T, H, D] -> [T, H, D]."""
        ...


class AttentionBackend(Protocol):
    def build(
        self, runs: Sequence[SeqRun], num_decodes: int, row_ends: Sequence[int], slot_mapping: torch.Tensor
    ) -> StepAttention:
        """The metadata of a step whose rows hold ``runs`` in order (``row_ends``: each one's exclusive end)."""
        ...


def build_backend(config: EngineConfig, kv_heads: int) -> AttentionBackend:
    """The backend ``config.attention_backend`` names, set up for this rank (``kv_heads`` of them)."""
    device = torch.device(config.device)
    if config.attention_backend == "triton":
        from hawker.attention.triton_backend import TritonAttentionBackend  # needs triton, which a CPU may lack

        return TritonAttentionBackend(kv_heads, device)
    from hawker.attention.torch_metadata import TorchAttentionBackend  # it imports SeqRun from here

    return TorchAttentionBackend(
        block_size=config.cache.block_size,
        device=device,
        native_decode=config.native_decode_attention,
        native_prefill=config.native_prefill_attention,
        consistent_numerics=config.consistent_numerics,
        batch_invariant=config.batch_invariant,
    )
