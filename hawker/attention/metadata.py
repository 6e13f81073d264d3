"""The torch backend's per-step attention inputs (built by hawker/attention/torch_metadata.py), passed explicitly."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hawker.attention.torch_backend import paged_attention
from hawker.host_transfer import upload


def padded_block_tables(
    tables: Sequence[Sequence[int]], device: torch.device, dtype: torch.dtype = torch.long
) -> torch.Tensor:
    """[len(tables), widest] block tables, shorter ones padded with block 0 (masked by their lengths)."""
    width = max((len(t) for t in tables), default=0)
    padded = [list(t) + [0] * (width - len(t)) for t in tables]
    return upload(padded, dtype, device).reshape(len(tables), width)


@dataclass(frozen=True)
class PrefillChunk:
    """A run of ``length`` query tokens of one sequence starting at ``start_pos``."""

    query_start: int  # row of the first token in the flat batch
    length: int
    start_pos: int  # tokens of this sequence already in the cache
    context_slots: torch.Tensor | None  # [context_len] cache slots when start_pos > 0

    @property
    def context_len(self) -> int:
        return self.start_pos + self.length


@dataclass(frozen=True)
class DecodeGroup:
    """Decodes of similar context length, attended in one padded SDPA call.

    Padding every decode to the longest context of the step wastes most of the
    gather (a memory-bound copy) when lengths differ a lot, so the runner sorts
    decodes by context length and splits them into groups.
    """

    first_row: int
    num_rows: int
    max_context: int
    # [num_rows, max_context] cache slot of every key position (padding
    # points at slot 0 and is masked out). Computed once per step, shared by all layers.
    slots: torch.Tensor
    mask: torch.Tensor  # [num_rows, 1, 1, max_context] True where a key position is real


@dataclass(frozen=True)
class PagedDecode:
    """Every decode of the step for the in-place CPU kernel (hawker/kernels/cpu_decode_attention.py):
    no padding, no copy of the context."""

    block_tables: torch.Tensor  # [num_decodes, widest] int64, short tables padded with block 0 (never read)
    context_lens: torch.Tensor  # [num_decodes] int64, keys each decode attends (its own token included)


@dataclass(frozen=True)
class PagedPrefill:
    """Every prefill chunk of the step for the in-place CPU kernel (hawker/kernels/cpu_prefill_attention.py);
    rows count from the step's first prefill row."""

    block_tables: torch.Tensor  # [chunks, widest] int64, short tables padded with block 0 (never read)
    chunk_rows: torch.Tensor  # [chunks] int64
    chunk_lens: torch.Tensor  # [chunks] int64
    chunk_starts: torch.Tensor  # [chunks] int64: the position of each chunk's first query


@dataclass(frozen=True)
class AttentionMetadata:
    """The flat batch holds ``num_decodes`` single-token decodes first, then prefill chunks."""

    slot_mapping: torch.Tensor  # [T] cache slot of each token
    num_decodes: int
    decode_groups: tuple[DecodeGroup, ...]
    prefills: tuple[PrefillChunk, ...]
    # Batch-invariant mode: each token row's own context (cache slots of
    # positions 0..its position), attended one query at a time.
    query_contexts: tuple[torch.Tensor, ...] | None = None
    # Consistent numerics: prefill queries attend on tiles of this many rows
    # aligned to multiples of it in the sequence (0 = one call per chunk).
    prefill_tile_rows: int = 0
    # Set instead of ``decode_groups`` when decodes run the in-place CPU kernel.
    paged_decode: PagedDecode | None = None
    # Set when prefill chunks run the in-place CPU kernel (their context_slots are then not made).
    paged_prefill: PagedPrefill | None = None

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        return paged_attention(q, k, v, k_cache, v_cache, self, scale)
