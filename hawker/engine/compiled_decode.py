"""A ``torch.compile``'d forward pass for small decode-only steps (CPU).

A decode step of a few sequences is cheap arithmetic wrapped in ~55 aten
calls per decoder layer; on a 2-core CPU their dispatch and the separate
passes over small tensors cost as much as the matmuls (benchmarks/NOTES.md).
Inductor fuses the elementwise work into a few C++ loops and removes the
per-op dispatch. Only decode-only steps with one decode group and at most
``max_rows`` rows take this path: their shapes vary along two dimensions
(rows, context length), both marked dynamic, so a handful of graphs cover
them and are all compiled at start-up. Prefill and mixed steps stay eager:
their matmuls dwarf the dispatch cost and their structure varies a lot.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import types
from collections.abc import Callable, Iterable

import torch
from torch import nn

from hawker.attention.metadata import AttentionMetadata, DecodeGroup, PagedDecode

logger = logging.getLogger(__name__)

KVCache = tuple[torch.Tensor, torch.Tensor]
Forward = Callable[[torch.Tensor, torch.Tensor, list[KVCache], AttentionMetadata], torch.Tensor]

# Rows up to this many use the compiled path by default: where int4 decode
# copies apply too, so one rows-dynamic graph (plus the 1-row one) covers it.
DEFAULT_COMPILE_DECODE_MAX_ROWS = 16


def can_compile_on_cpu() -> bool:
    """Inductor's CPU backend needs a C++ compiler, and the user may have turned dynamo off."""
    compiler = os.environ.get("CXX") or "g++"
    return shutil.which(compiler) is not None and not torch._dynamo.config.disable


def decode_only_single_group(meta: AttentionMetadata) -> bool:
    """Decodes only, attended in one call: the in-place kernel, or one padded SDPA group."""
    return not meta.prefills and (meta.paged_decode is not None or len(meta.decode_groups) == 1)


class CompiledDecode:
    """Runs eligible decode steps through the compiled forward; ``warm_up`` compiles it."""

    def __init__(self, model: nn.Module, max_rows: int, paged_decode: bool = False) -> None:
        self.max_rows = max_rows
        self.paged_decode = paged_decode  # steps' decodes use the in-place kernel (PagedDecode metadata)
        # Guards on the model's ~400 parameters and attributes cost 1.3 ms a
        # step (measured: 1.5 ms -> 0.2 ms of "TorchDynamo Cache Lookup").
        # Skipping them is safe while the modules and their tensors are never
        # swapped for others (weight updates must copy into them in place), and
        # as long as no other model can hit this graph: see _private_forward.
        self._forward: Forward = torch.compile(
            _private_forward(model),
            dynamic=None,
            fullgraph=True,
            options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe},
        )

    def handles(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> bool:
        return input_ids.shape[0] <= self.max_rows and decode_only_single_group(meta)

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], meta: AttentionMetadata
    ) -> torch.Tensor:
        _mark_step_dims_dynamic(input_ids, positions, meta)
        return self._forward(input_ids, positions, kv_caches, meta)

    def warm_up(self, kv_caches: list[KVCache], row_counts: Iterable[int]) -> float:
        """Compile the graphs for ``row_counts`` before serving; returns the seconds it took.

        The dummy steps write keys/values to slots 0..rows-1 of block 0. That is
        harmless before any request runs: every sequence writes a cache slot
        before any step reads it.
        """
        start = time.perf_counter()
        device = kv_caches[0][0].device
        with torch.inference_mode():
            for rows in sorted(set(row_counts)):
                self(*_dummy_decode_step(rows, device), kv_caches, _dummy_meta(rows, device, self.paged_decode))
        seconds = time.perf_counter() - start
        logger.info("compiled decode steps of 1..%d rows in %.1f s", self.max_rows, seconds)
        return seconds


def _private_forward(model: nn.Module) -> Forward:
    """``model``'s forward as a function whose code object belongs to this model alone.

    Dynamo keeps compiled graphs on the code object of the function it
    compiles. Every model of the Llama family shares one forward; with the
    module guards skipped, a second model in the process (another size, or
    qk-norm) would run the first one's graph. A fresh copy of the code
    object gives each model its own graph cache.
    """

    def forward(
        input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], meta: AttentionMetadata
    ) -> torch.Tensor:
        return model(input_ids, positions, kv_caches, meta)

    code = forward.__code__.replace(co_name=f"forward_of_model_{id(model):x}")
    return types.FunctionType(code, forward.__globals__, code.co_name, None, forward.__closure__)


def warm_up_row_counts(max_rows: int, branch_rows: Iterable[int]) -> list[int]:
    """Row counts whose steps compile every graph the compiled path can meet.

    One row is a graph of its own (dynamo specialises sizes of 1); 2 and up
    share one until a projection switches weight copy at ``branch_rows``.
    """
    counts = {1, 2, max_rows} | {rows for rows in branch_rows if 2 < rows <= max_rows}
    return sorted(rows for rows in counts if rows <= max_rows)


def _mark_step_dims_dynamic(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
    # Without this the first recompile would come mid-serving (automatic dynamic).
    for tensor in (input_ids, positions, meta.slot_mapping):
        torch._dynamo.maybe_mark_dynamic(tensor, 0)
    if meta.paged_decode is not None:
        for tensor in (meta.paged_decode.block_tables, meta.paged_decode.context_lens):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        torch._dynamo.maybe_mark_dynamic(meta.paged_decode.block_tables, 1)
        return
    group = meta.decode_groups[0]
    torch._dynamo.maybe_mark_dynamic(group.slots, 0)
    torch._dynamo.maybe_mark_dynamic(group.slots, 1)
    torch._dynamo.maybe_mark_dynamic(group.mask, 0)
    torch._dynamo.maybe_mark_dynamic(group.mask, 3)


def _dummy_decode_step(rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.zeros(rows, dtype=torch.long, device=device)
    positions = torch.ones(rows, dtype=torch.long, device=device)
    return input_ids, positions


def _dummy_meta(rows: int, device: torch.device, paged_decode: bool) -> AttentionMetadata:
    context = 2  # not 1, which dynamo would specialise
    if paged_decode:
        tables = torch.zeros(rows, context, dtype=torch.long, device=device)
        lens = torch.full((rows,), context, dtype=torch.long, device=device)
        return AttentionMetadata(
            slot_mapping=torch.arange(rows, device=device),
            num_decodes=rows,
            decode_groups=(),
            prefills=(),
            paged_decode=PagedDecode(tables, lens),
        )
    slots = torch.arange(context, device=device).repeat(rows, 1)
    mask = torch.ones(rows, 1, 1, context, dtype=torch.bool, device=device)
    return AttentionMetadata(
        slot_mapping=torch.arange(rows, device=device),
        num_decodes=rows,
        decode_groups=(DecodeGroup(0, rows, context, slots, mask),),
        prefills=(),
    )
