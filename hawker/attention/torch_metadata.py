"""The torch backend's per-step metadata, built from the step's sequences.

Decodes come first in the flat batch, longest context first, so that decode
groups of similar length are contiguous rows. With the in-place C kernels
(on a CPU where they build) decodes and prefill chunks need only their block
tables; otherwise decodes are padded per length group and prefill chunks
carry the cache slots of their context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hawker.attention.backend import SeqRun
from hawker.attention.metadata import (
    AttentionMetadata,
    DecodeGroup,
    PagedDecode,
    PagedPrefill,
    PrefillChunk,
    padded_block_tables,
)
from hawker.host_transfer import upload

# Decode keys are padded to a multiple of this many positions. SDPA's CPU
# kernel gives a query the same result for any such padding of its (masked)
# keys, but not for padding to an arbitrary length.
DECODE_KEY_MULTIPLE = 16
# Prefill queries attend on tiles of this many positions, aligned to its
# multiples: SDPA's CPU kernel blocks its work by the number of queries, so a
# query's result would otherwise depend on the length of its chunk.
CONSISTENT_PREFILL_TILE = 128
# A decode joins the current group while its context is at least this fraction
# of the group's longest; padded work per group is then at most 1/0.6 of real.
DECODE_GROUP_MIN_FILL = 0.6
# Smaller groups are merged into the one before: per-call overhead beats padding there.
DECODE_GROUP_MIN_ROWS = 8


def split_by_length(context_lens: Sequence[int]) -> list[tuple[int, int]]:
    """(first, count) runs of ``context_lens`` (sorted longest first) of similar length."""
    runs: list[tuple[int, int]] = []
    first = 0
    for index, length in enumerate(context_lens):
        if length < DECODE_GROUP_MIN_FILL * context_lens[first] and index - first >= DECODE_GROUP_MIN_ROWS:
            runs.append((first, index - first))
            first = index
    if context_lens:
        runs.append((first, len(context_lens) - first))
    return runs


@dataclass(frozen=True)
class TorchAttentionBackend:
    """Builds ``AttentionMetadata`` (hawker/attention/metadata.py) for hawker/attention/torch_backend.py."""

    block_size: int
    device: torch.device
    native_decode: bool  # decodes through the in-place C kernel
    native_prefill: bool  # prompt chunks through the in-place C kernel
    consistent_numerics: bool
    batch_invariant: bool

    def build(
        self, runs: Sequence[SeqRun], num_decodes: int, row_ends: Sequence[int], slot_mapping: torch.Tensor
    ) -> AttentionMetadata:
        decodes, prefills = runs[:num_decodes], runs[num_decodes:]
        native_prefill = self.native_prefill and bool(prefills)
        chunks = []
        for run, end in zip(prefills, row_ends[num_decodes:], strict=True):
            context = self._context_slots(run) if run.start_pos and not native_prefill else None
            chunks.append(PrefillChunk(end - run.num_tokens, run.num_tokens, run.start_pos, context))
        in_place = self.native_decode and bool(decodes)
        # The native prefill kernel is row-invariant: consistent numerics needs no query tiles with it.
        tiles = self.consistent_numerics and not native_prefill
        return AttentionMetadata(
            slot_mapping=slot_mapping,
            num_decodes=num_decodes,
            decode_groups=() if in_place else self._decode_groups(decodes),
            paged_decode=self._paged_decode(decodes) if in_place else None,
            prefills=tuple(chunks),
            query_contexts=self._query_contexts(runs) if self.batch_invariant else None,
            prefill_tile_rows=CONSISTENT_PREFILL_TILE if tiles else 0,
            paged_prefill=self._paged_prefill(chunks, prefills, num_decodes) if native_prefill else None,
        )

    def _paged_prefill(
        self, chunks: Sequence[PrefillChunk], prefills: Sequence[SeqRun], first_row: int
    ) -> PagedPrefill:
        """Block tables, rows (from the first prefill row), lengths and start positions of the prefill chunks."""
        columns = [(c.query_start - first_row, c.length, c.start_pos) for c in chunks]
        rows, lens, starts = (upload(list(column), torch.long, self.device) for column in zip(*columns, strict=True))
        return PagedPrefill(padded_block_tables([s.block_table for s in prefills], self.device), rows, lens, starts)

    def _query_contexts(self, runs: Sequence[SeqRun]) -> tuple[torch.Tensor, ...]:
        """Cache slots of positions 0..p for every query row (p its position), in row order."""
        contexts: list[torch.Tensor] = []
        for run in runs:
            slots = self._context_slots(run)
            contexts.extend(slots[: position + 1] for position in range(run.start_pos, run.start_pos + run.num_tokens))
        return tuple(contexts)

    def _decode_groups(self, decodes: Sequence[SeqRun]) -> tuple[DecodeGroup, ...]:
        """``decodes`` (longest context first) split into groups, each padded to its own longest context.

        Consistent numerics: rounded up to a multiple of ``DECODE_KEY_MULTIPLE``,
        so a decode's attention does not depend on the group it lands in.
        """
        context_lens = [s.start_pos + 1 for s in decodes]
        multiple = DECODE_KEY_MULTIPLE if self.consistent_numerics else 1
        groups: list[DecodeGroup] = []
        for first, count in split_by_length(context_lens):
            members = decodes[first : first + count]
            lens = upload(context_lens[first : first + count], torch.long, self.device)
            longest = -(-context_lens[first] // multiple) * multiple
            # Padded positions past a table's end read block 0 (masked out).
            width = -(-longest // self.block_size)
            table = padded_block_tables(
                [[*s.block_table, *[0] * (width - len(s.block_table))] for s in members], self.device
            )
            mask = torch.arange(longest, device=self.device).unsqueeze(0) < lens.unsqueeze(1)
            slots = self._slots(table, longest)
            groups.append(DecodeGroup(first, count, longest, slots, mask[:, None, None, :]))
        return tuple(groups)

    def _paged_decode(self, decodes: Sequence[SeqRun]) -> PagedDecode:
        """Block tables and context lengths of ``decodes``, for the in-place kernel."""
        lens = upload([s.start_pos + 1 for s in decodes], torch.long, self.device)
        # At least two columns: a compiled decode step would specialise (and recompile) on a width of 1.
        tables = [[*s.block_table, 0] if len(s.block_table) < 2 else s.block_table for s in decodes]
        return PagedDecode(padded_block_tables(tables, self.device), lens)

    def _context_slots(self, run: SeqRun) -> torch.Tensor:
        """Cache slots of every position of ``run`` up to the end of this step's chunk."""
        table = upload([list(run.block_table)], torch.long, self.device)
        return self._slots(table, run.start_pos + run.num_tokens)[0]

    def _slots(self, tables: torch.Tensor, length: int) -> torch.Tensor:
        """[B, blocks] block tables -> [B, length] cache slots of positions 0..length-1."""
        # A fresh tensor with dense strides (not a slice of a wider one): the
        # compiled decode graph is specialised to dense [rows, context] slots.
        positions = torch.arange(length, device=self.device)
        return tables[:, positions // self.block_size] * self.block_size + positions % self.block_size
