"""The token masks of a step's constrained rows: filled on a worker thread, applied to logits before sampling."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from hawker.structured.grammars import SequenceGrammar


@dataclass
class MaskStats:
    """Time spent on masks (for /metrics): filling them (on the mask thread, overlapping the forward pass)
    and waiting for them before sampling (the part that did not overlap)."""

    steps: int = 0
    rows: int = 0
    fill_seconds: float = 0.0
    wait_seconds: float = 0.0


class StepMasks:
    """One bitmask row per constrained sequence that samples this step (``rows``: request id -> row).

    The rows are filled on ``pool`` from the moment the step is scheduled,
    while the forward pass runs; ``bitmask()`` waits for them. Pickling (to
    other ranks) waits too and sends the filled tensor.
    """

    def __init__(
        self,
        grammars: Sequence[tuple[str, SequenceGrammar]],
        vocab_size: int,
        pool: ThreadPoolExecutor,
        stats: MaskStats | None = None,
    ) -> None:
        self.rows = {request_id: row for row, (request_id, _) in enumerate(grammars)}
        self._bitmask = torch.full((len(grammars), -(-vocab_size // 32)), -1, dtype=torch.int32)
        self._stats = stats
        self._filled: Future[None] | None = pool.submit(_fill, [g for _, g in grammars], self._bitmask, stats)

    def bitmask(self) -> torch.Tensor:
        if self._filled is not None:
            start = time.perf_counter()
            self._filled.result()
            self._filled = None
            if self._stats is not None:
                self._stats.wait_seconds += time.perf_counter() - start
        return self._bitmask

    def apply(self, logits: torch.Tensor, request_ids: Sequence[str]) -> None:
        """Mask, in place, the rows of ``logits`` (one per id of ``request_ids``) whose sequence is constrained."""
        found = [(index, self.rows[rid]) for index, rid in enumerate(request_ids) if rid in self.rows]
        if not found:
            return
        indices = torch.tensor([index for index, _ in found], device=logits.device)
        words = self.bitmask()[[row for _, row in found]].to(logits.device)
        allowed = unpack_bits(words, logits.shape[-1])
        logits[indices] = logits[indices].masked_fill(~allowed, float("-inf"))

    def __getstate__(self) -> dict[str, Any]:
        return {"rows": self.rows, "_bitmask": self.bitmask(), "_filled": None, "_stats": None}


def unpack_bits(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, words] int32 bitmasks -> [rows, vocab_size] bools (token t: bit t % 32 of word t // 32)."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(words.shape[0], -1)[:, :vocab_size].bool()


def _fill(grammars: list[SequenceGrammar], bitmask: torch.Tensor, stats: MaskStats | None) -> None:
    start = time.perf_counter()
    for row, grammar in enumerate(grammars):
        grammar.fill_mask(bitmask, row)
    if stats is not None:  # written by the one mask thread only
        stats.steps += 1
        stats.rows += len(grammars)
        stats.fill_seconds += time.perf_counter() - start
