"""Temperature, top-k, top-p and min-p sampling of CPU logit rows without a sort (``csrc/sampling.c``).

The torch sampler sorts a whole row wherever its top-p set does not end
among the row's 256 largest logits, which a flat distribution makes the
common case: ~200 ms a step of 128 rows of the default model's 49,152
logits (top-p 0.95, temperature 0.8), against ~0.5 ms for greedy rows, and
plain temperature sampling ~40 ms for its float64 cumulative sums
(benchmarks/NOTES.md, session 22). The kernel finds each row's kept set by
a radix select over the logits' bits and draws from it in a few passes, one
row per thread at a time, with the same definitions (the C file's header);
each row's result depends on that row alone. Repetition, frequency and
presence penalties are applied in one pass over a row's history (the
torch code built two [rows, vocabulary] scatter tables a step for them),
and the logprobs a request asks for (processed or raw, its token's, rank and
top n) come from the same passes: ~115 ms a 128-row step in torch at
temperature 1 with logprobs=1, ~7 ms here.

``HAWKER_SAMPLING_KERNEL=0`` keeps the torch sampler, the off switch.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from hawker.kernels.native import CFunction, built_kernel
from hawker.switches import switch_on

SWITCH_VARIABLE = "HAWKER_SAMPLING_KERNEL"
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # attention_common.h's codes


@functools.cache
def _kernel() -> CFunction | None:
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    # logits, dtype, stride, rows, vocab; inverse temperatures, top-ks, top-ps, min-ps, uniforms; history, its
    # starts, prompt lengths, repetition, frequency, presence penalties; out; chosen logprobs, ranks, top ids,
    # top logprobs, top count, raw modes; threads
    return built_kernel("sampling", [pointer, ctypes.c_int, i64, i64, i64, *[pointer] * 16, i64, pointer, ctypes.c_int])


@dataclass(frozen=True)
class Penalties:
    """Each row's tokens so far (prompt, then outputs) and its penalties, as SamplingParams names them."""

    histories: Sequence[Sequence[int]]
    prompt_lengths: list[int]
    repetition: list[float]
    frequency: list[float]
    presence: list[float]


class Drawn(NamedTuple):
    """Each row's token and, where asked for, logprob_tensors' five (hawker/engine/sampler.py): the token, its
    log-probability and rank, and the top ids and log-probabilities, of the distribution it was drawn from."""

    token_ids: torch.Tensor
    logprobs: tuple[torch.Tensor, ...] | None


def switched_on() -> bool:
    """``HAWKER_SAMPLING_KERNEL``: 1 (the default) or 0; another value is a ValueError."""
    return switch_on(SWITCH_VARIABLE)


def serves(logits: torch.Tensor) -> bool:
    """Whether the kernel takes ``logits``: 2-D float32 or bfloat16 CPU rows, built and switched on."""
    return (
        logits.dim() == 2
        and logits.dtype in _DTYPES
        and logits.device.type == "cpu"
        and logits.shape[1] > 0
        and switched_on()
        and _kernel() is not None
    )


def sample(
    logits: torch.Tensor,
    temperatures: list[float],
    top_ks: list[int],
    top_ps: list[float],
    min_ps: list[float],
    uniforms: torch.Tensor,
    penalties: Penalties | None = None,
    top_logprobs: int | None = None,
    raw_logprobs: list[bool] | None = None,
) -> Drawn | None:
    """One token a row of ``logits`` [rows, vocab] (``serves(logits)`` first).

    Each row's logits, after ``penalties`` if given, over its temperature (0: greedy, the first largest), cut
    to its top-k (-1: off), top-p (1: off) and min-p (0: off) sets, drawn by inverse CDF in token order at its
    number of ``uniforms`` [rows, 1] (float64, in [0, 1)); with ``top_logprobs`` (>= 0) also each token's
    log-probability and rank and the row's ``top_logprobs`` most likely tokens, of the distribution drawn from
    (where ``raw_logprobs`` says so, of the row as given: temperature 1, no penalty, nothing cut).
    None where a row holds NaN or an infinite largest logit, or scratch memory ran out: the caller samples
    another way.
    """
    kernel = _kernel()
    assert kernel is not None
    rows = logits if logits.stride(-1) == 1 else logits.contiguous()
    count, vocab = rows.shape
    if count == 0:
        return Drawn(torch.empty(0, dtype=torch.long), None)
    # 0 marks a greedy row (temperature 0): the first largest logit, logprobs at temperature 1.
    inverse_temperatures = torch.tensor([1.0 / t if t > 0 else 0.0 for t in temperatures], dtype=torch.float32)
    ks = torch.tensor([vocab if k == -1 else min(k, vocab) for k in top_ks], dtype=torch.int64)
    ps = torch.tensor(top_ps, dtype=torch.float32)
    mins = torch.tensor(min_ps, dtype=torch.float32)
    draws = uniforms.to(torch.float64).contiguous()
    history = _history_arrays(penalties) if penalties is not None else None
    history_pointers = [array.ctypes.data for array in history] if history is not None else [None] * 6
    out = torch.empty(count, dtype=torch.long)
    top = top_logprobs if top_logprobs is not None else 0
    logprobs = (
        torch.empty(count),
        torch.empty(count, dtype=torch.long),
        torch.empty((count, top), dtype=torch.long),
        torch.empty((count, top)),
    )
    logprob_pointers = [t.data_ptr() for t in logprobs] if top_logprobs is not None else [None] * 4
    raw = torch.tensor(raw_logprobs if raw_logprobs is not None else [False] * count, dtype=torch.uint8)
    failed = kernel(
        rows.data_ptr(), _DTYPES[rows.dtype], rows.stride(0), count, vocab, inverse_temperatures.data_ptr(),
        ks.data_ptr(), ps.data_ptr(), mins.data_ptr(), draws.data_ptr(), *history_pointers, out.data_ptr(),
        *logprob_pointers, top, raw.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if failed:
        return None
    return Drawn(out, (out, *logprobs) if top_logprobs is not None else None)


def _history_arrays(penalties: Penalties) -> tuple[np.ndarray, ...]:
    """The kernel's history arguments: every row's tokens end to end, where each row's start, then per row
    its prompt length and three penalties."""
    lengths = np.fromiter((len(tokens) for tokens in penalties.histories), dtype=np.int64)
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    tokens = np.fromiter(itertools.chain.from_iterable(penalties.histories), dtype=np.int32, count=int(starts[-1]))
    return (
        tokens,
        starts,
        np.asarray(penalties.prompt_lengths, dtype=np.int64),
        np.asarray(penalties.repetition, dtype=np.float32),
        np.asarray(penalties.frequency, dtype=np.float32),
        np.asarray(penalties.presence, dtype=np.float32),
    )
