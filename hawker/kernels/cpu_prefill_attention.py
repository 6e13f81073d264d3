"""Causal attention of prompt chunks over the paged KV cache, read in place on a CPU
(``csrc/paged_prefill_attention.c``).

torch's CPU flash attention runs at about 115 GFLOP/s in bfloat16 on the
2-core development machine (a 1,536-token prompt: 25 ms a layer), twice the
time of the prompt's matmuls; the C kernel's bfloat16 dot products
(AVX512-BF16 pairs) and its layout of 16 keys to a vector do the same work
several times faster (benchmarks/NOTES.md). Every query row is computed
alone in an order fixed by its position, so its result does not depend on
the chunk or the step it is in (consistent numerics needs no query tiles).
It is a torch custom op, so a compiled step calls it as one opaque kernel.

Where the CPU has AMX, both products run as tile multiplies (16 query rows
by 32 keys or dims a step), which keeps that property and is several times
faster on long prompts (benchmarks/NOTES.md, session 15); for 64-dim heads
in one sweep over the keys with a running largest score per row, flash
attention's order (session 17);
``HAWKER_PREFILL_ATTENTION_AMX=0`` keeps the vector dot products instead,
the off switch.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from hawker.kernels.native import (
    DTYPE_CODES,
    CFunction,
    attention_inputs,
    define_cpu_op,
    int64_arrays,
    load_kernel_library,
)
from hawker.switches import switch_on

AMX_VARIABLE = "HAWKER_PREFILL_ATTENTION_AMX"


def amx_requested() -> bool:
    """Whether ``HAWKER_PREFILL_ATTENTION_AMX`` (1, the default, or 0) asks for AMX tile multiplies where
    the CPU has them; another value is a ValueError."""
    return switch_on(AMX_VARIABLE)


def amx_available() -> bool:
    """The kernel was built with AMX tile instructions and this process may use them (Linux grants them)."""
    library = load_kernel_library("paged_prefill_attention")
    return library is not None and bool(library.hawker_paged_prefill_attention_amx())


@functools.cache
def _kernel() -> CFunction | None:
    library = load_kernel_library("paged_prefill_attention")
    if library is None:
        return None
    function = library.hawker_paged_prefill_attention
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [pointer] * 8 + [i64] * 7 + [ctypes.c_float] + [ctypes.c_int] * 4
    function.restype = ctypes.c_int
    return function


def available(dtype: torch.dtype) -> bool:
    """The kernel built on this machine and handles ``dtype``."""
    return dtype in DTYPE_CODES and _kernel() is not None


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    chunk_rows: torch.Tensor,
    chunk_lens: torch.Tensor,
    chunk_starts: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q: [T, H, D] (tokens may be strided); caches: [blocks, block_size, Hkv, D] of q's dtype or an 8-bit
    float; chunk c's queries are rows ``chunk_rows[c]`` .. + ``chunk_lens[c]`` of q at positions
    ``chunk_starts[c]`` onwards, attending causally to their sequence's keys through ``block_tables[c]``
    (the chunk's own keys already in the cache).
    Returns [T, H, D]; rows of q in no chunk are zero. Compiled graphs call it through the op
    ``hawker::paged_prefill_attention``."""
    args = (q, k_cache, v_cache, block_tables, chunk_rows, chunk_lens, chunk_starts, scale)
    if torch.compiler.is_compiling():
        return torch.ops.hawker.paged_prefill_attention(*args)
    return _run(*args)


def _run(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    chunk_rows: torch.Tensor,
    chunk_lens: torch.Tensor,
    chunk_starts: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("the paged prefill attention kernel is not built; check available() first")
    q, cache_dtype = attention_inputs(q, k_cache, v_cache)
    tables, rows, lens, starts = int64_arrays(block_tables, chunk_rows, chunk_lens, chunk_starts)
    tokens, heads, dim = q.shape
    out = torch.zeros((tokens, heads, dim), dtype=q.dtype)
    status = kernel(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        out.data_ptr(),
        tables.data_ptr(),
        rows.data_ptr(),
        lens.data_ptr(),
        starts.data_ptr(),
        lens.shape[0],
        tables.shape[1],
        q.stride(0),
        heads,
        k_cache.shape[2],
        dim,
        k_cache.shape[1],
        scale,
        DTYPE_CODES[q.dtype],
        cache_dtype,
        int(amx_requested()),
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("paged prefill attention could not allocate its scratch memory")
    return out


def _fake(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    chunk_rows: torch.Tensor,
    chunk_lens: torch.Tensor,
    chunk_starts: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return q.new_empty(q.shape)


define_cpu_op(
    "hawker::paged_prefill_attention",
    "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor chunk_rows, Tensor chunk_lens, "
    "Tensor chunk_starts, float scale) -> Tensor",
    _run,
    _fake,
)
