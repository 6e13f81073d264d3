"""CUDA graphs for decode-only steps on the Triton backend.

A decode step launches a few hundred small kernels; on a GPU their launch
cost (several microseconds each, from Python) is most of the step for small
batches. Here each batch size in a ladder (1, 2, 4, 8, then multiples of 8)
gets one captured forward over static input buffers; a step of ``n`` decodes
copies its inputs into the buffers, pads to the next captured size and
replays the graph.

Padded rows write nowhere (slot -1, skipped by ``write_kv``) and attend to
one key of block 0, so they cost a little work and change nothing. The
number of context splits of the decode kernel is fixed per size for the
longest context the engine allows; splits past a short context exit at once.

Inputs are staged in pinned host memory and copied without blocking, so the
host does not wait for the device before the replay is queued.

``capture="eager"`` runs the forward instead of a graph at every replay: the
same buffers, padding and metadata, testable on a machine without a GPU.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hawker.attention.triton_backend import DECODE_TARGET_PROGRAMS, TritonAttentionMetadata
from hawker.kernels.decode_attention import num_splits_for
from hawker.models.base import CausalLM
from hawker.step import ScheduledSeq

logger = logging.getLogger(__name__)

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


def graph_batch_sizes(max_size: int) -> list[int]:
    """The captured batch sizes: 1, 2, 4, then every multiple of 8 up to ``max_size`` (always included)."""
    sizes = [s for s in (1, 2, 4) if s < max_size]
    sizes += list(range(8, max_size, 8))
    return sorted({*sizes, max_size})


class _StaticInputs:
    """Device buffers every captured graph reads, and their pinned host staging copies."""

    def __init__(self, max_rows: int, max_blocks: int, device: torch.device) -> None:
        pin = device.type == "cuda"
        self.host_ids = torch.zeros(max_rows, dtype=torch.long, pin_memory=pin)
        self.host_positions = torch.zeros(max_rows, dtype=torch.long, pin_memory=pin)
        self.host_slots = torch.full((max_rows,), -1, dtype=torch.long, pin_memory=pin)
        self.host_tables = torch.zeros(max_rows, max_blocks, dtype=torch.int32, pin_memory=pin)
        self.host_context = torch.ones(max_rows, dtype=torch.int32, pin_memory=pin)
        self.input_ids = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_rows,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(max_rows, max_blocks, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(max_rows, dtype=torch.int32, device=device)
        self.uploaded: torch.cuda.Event | None = None  # recorded after the last upload's copies (CUDA)

    def stage(self, rows: Sequence[ScheduledSeq], padded: int, block_size: int) -> None:
        """Write ``rows`` (then padding up to ``padded`` rows) to the host buffers.

        With overlap scheduling the previous replay may still be queued, so
        its copies out of these buffers are waited for first (they run
        before its forward, so this wait is short).
        """
        if self.uploaded is not None:
            self.uploaded.synchronize()
        count = len(rows)
        # A decode feeds one token at position start_pos.
        positions = [row.start_pos for row in rows]
        blocks = [row.block_table[p // block_size] for row, p in zip(rows, positions, strict=True)]
        width = max(len(row.block_table) for row in rows)
        tables = [[*row.block_table, *[0] * (width - len(row.block_table))] for row in rows]
        self.host_ids[:count] = torch.tensor([row.token_ids[0] for row in rows])
        self.host_positions[:count] = torch.tensor(positions)
        self.host_slots[:count] = torch.tensor(
            [b * block_size + p % block_size for b, p in zip(blocks, positions, strict=True)]
        )
        self.host_context[:count] = torch.tensor(positions) + 1
        self.host_tables[:count, :width] = torch.tensor(tables, dtype=torch.int32)
        # Padding rows: no cache write, one key of block 0 to attend to.
        self.host_ids[count:padded] = 0
        self.host_positions[count:padded] = 0
        self.host_slots[count:padded] = -1
        self.host_context[count:padded] = 1
        self.host_tables[count:padded, 0] = 0

    def upload(self, padded: int) -> None:
        """Queue the host -> device copies of the first ``padded`` rows without waiting for them."""
        pairs = (
            (self.input_ids, self.host_ids),
            (self.positions, self.host_positions),
            (self.slot_mapping, self.host_slots),
            (self.block_tables, self.host_tables),
            (self.context_lens, self.host_context),
        )
        for device_buffer, host_buffer in pairs:
            device_buffer[:padded].copy_(host_buffer[:padded], non_blocking=True)
        if self.input_ids.is_cuda:
            self.uploaded = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self.uploaded.record()

    def metadata(self, rows: int, kv_heads: int) -> TritonAttentionMetadata:
        max_blocks = self.block_tables.shape[1]
        return TritonAttentionMetadata(
            slot_mapping=self.slot_mapping[:rows],
            num_decodes=rows,
            block_tables=self.block_tables[:rows],
            context_lens=self.context_lens[:rows],
            prefill_query_starts=self.context_lens[:0],
            max_prefill_len=0,
            decode_splits=num_splits_for(rows, kv_heads, max_blocks, DECODE_TARGET_PROGRAMS),
        )


class DecodeGraphs:
    """Captured decode forwards for a ladder of batch sizes up to ``max_rows``."""

    def __init__(
        self,
        model: CausalLM,
        kv_caches: KVCaches,
        *,
        max_rows: int,
        max_blocks_per_seq: int,
        block_size: int,
        kv_heads: int,
        capture: str = "cuda",
    ) -> None:
        if capture not in ("cuda", "eager"):
            raise ValueError(f"capture must be 'cuda' or 'eager', got {capture!r}")
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.kv_heads = kv_heads
        self.capture_mode = capture
        self.sizes = graph_batch_sizes(max_rows)
        device = kv_caches[0][0].device
        self.inputs = _StaticInputs(max_rows, max_blocks_per_seq, device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0

    @property
    def max_rows(self) -> int:
        return self.sizes[-1]

    def handles(self, num_rows: int) -> bool:
        return 0 < num_rows <= self.max_rows

    def capture_all(self) -> None:
        """Capture every size, largest first so smaller graphs reuse its memory pool."""
        started = time.perf_counter()
        if self.capture_mode == "cuda":
            pool = torch.cuda.graph_pool_handle()
            for rows in reversed(self.sizes):
                self._capture(rows, pool)
            torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - started
        logger.info(
            "decode graphs: %d batch sizes up to %d captured in %.1f s",
            len(self.sizes),
            self.max_rows,
            self.capture_seconds,
        )

    def _forward(self, rows: int) -> torch.Tensor:
        meta = self.inputs.metadata(rows, self.kv_heads)
        hidden: torch.Tensor = self.model(
            self.inputs.input_ids[:rows], self.inputs.positions[:rows], self.kv_caches, meta
        )
        return hidden

    def _capture(self, rows: int, pool: Any) -> None:
        # One eager run first: Triton compiles its kernels outside the capture.
        self._forward(rows)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.outputs[rows] = self._forward(rows)
        self.graphs[rows] = graph

    def run(self, rows: Sequence[ScheduledSeq], fill_input_ids: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """Hidden states [len(rows), hidden] of one decode-only step through the captured graph.

        ``fill_input_ids`` writes the ids of pending tokens (overlap
        scheduling) into the uploaded input ids, on the device.
        """
        padded = self.sizes[bisect.bisect_left(self.sizes, len(rows))]
        self.inputs.stage(rows, padded, self.block_size)
        self.inputs.upload(padded)
        fill_input_ids(self.inputs.input_ids)
        if self.capture_mode == "eager":
            return self._forward(padded)[: len(rows)]
        self.graphs[padded].replay()
        return self.outputs[padded][: len(rows)]
