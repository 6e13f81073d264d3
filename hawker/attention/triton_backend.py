"""Paged attention through the Triton kernels (``hawker/kernels``): the GPU backend.

The step's metadata is a handful of int32 tensors shared by every layer:
block tables, context lengths and where each sequence's query run starts.
Decodes (the first ``num_decodes`` rows, one token each) go through the
split-context decode kernel; prefill chunks through the variable-length one.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hawker.attention.backend import SeqRun
from hawker.attention.metadata import padded_block_tables
from hawker.host_transfer import upload
from hawker.kernels.decode_attention import num_splits_for, paged_decode_attention
from hawker.kernels.kv_cache import write_kv
from hawker.kernels.prefill_attention import paged_prefill_attention

# Programs the decode kernel aims for: a few waves on a 132-SM H100.
DECODE_TARGET_PROGRAMS = 4 * 132


@dataclass(frozen=True)
class TritonAttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64
    num_decodes: int  # the first rows; one token each
    block_tables: torch.Tensor  # [S, max_blocks] int32, decodes first
    context_lens: torch.Tensor  # [S] int32
    prefill_query_starts: torch.Tensor  # [P + 1] int32, relative to the first prefill row
    max_prefill_len: int
    decode_splits: int

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        write_kv(k, v, k_cache, v_cache, self.slot_mapping)
        decodes = self.num_decodes
        if decodes == q.shape[0]:
            return self._decode(q, k_cache, v_cache, scale)
        out = torch.empty_like(q)
        if decodes:
            out[:decodes] = self._decode(q[:decodes], k_cache, v_cache, scale)
        out[decodes:] = paged_prefill_attention(
            q[decodes:],
            k_cache,
            v_cache,
            self.block_tables[decodes:],
            self.prefill_query_starts,
            self.context_lens[decodes:],
            self.max_prefill_len,
            scale,
        )
        return out

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        n = self.num_decodes
        tables, lens = self.block_tables[:n], self.context_lens[:n]
        return paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, self.decode_splits)


def build_metadata(
    runs: Sequence[SeqRun], num_decodes: int, slot_mapping: torch.Tensor, kv_heads: int, device: torch.device
) -> TritonAttentionMetadata:
    """``runs`` in row order, the ``num_decodes`` decodes first."""
    prefill_lens = [run.num_tokens for run in runs[num_decodes:]]
    starts = [0, *itertools.accumulate(prefill_lens)]
    decode_blocks = max((len(run.block_table) for run in runs[:num_decodes]), default=1)
    return TritonAttentionMetadata(
        slot_mapping=slot_mapping,
        num_decodes=num_decodes,
        block_tables=padded_block_tables([run.block_table for run in runs], device, torch.int32),
        context_lens=upload([r.start_pos + r.num_tokens for r in runs], torch.int32, device),
        prefill_query_starts=upload(starts, torch.int32, device),
        max_prefill_len=max(prefill_lens, default=0),
        decode_splits=num_splits_for(num_decodes, kv_heads, decode_blocks, DECODE_TARGET_PROGRAMS),
    )


@dataclass(frozen=True)
class TritonAttentionBackend:
    """Builds ``TritonAttentionMetadata`` for a step (hawker/attention/backend.py's interface)."""

    kv_heads: int  # this rank's
    device: torch.device

    def build(
        self, runs: Sequence[SeqRun], num_decodes: int, row_ends: Sequence[int], slot_mapping: torch.Tensor
    ) -> TritonAttentionMetadata:
        del row_ends  # the kernels find each run's rows from its length
        return build_metadata(runs, num_decodes, slot_mapping, self.kv_heads, self.device)
