"""Decode attention that reads the paged KV cache in place on a CPU (``csrc/paged_decode_attention.c``).

The torch path gathers every decode's keys and values into a padded copy
and runs SDPA per length group; on a CPU that copy and the masked SDPA calls
dominate a batched decode step (benchmarks/NOTES.md). The C kernel walks each
sequence's block table instead: one call per layer for all decodes, no
padding, no copy. It is a torch custom op, so a ``torch.compile``'d decode
step calls it as one opaque kernel. Its CPU kernel is C++
(``csrc/paged_decode_attention_op.cpp``, built on first use) where torch's
headers and a C++ compiler are at hand, else ``_run`` here through ctypes:
~9 against ~21 us a call at one sequence, one call a layer.

Its bfloat16 loops take a whole sequence (every KV head) as a work item, so
that each block's rows are read whole, front to back (benchmarks/NOTES.md,
session 14); ``HAWKER_DECODE_ATTENTION_ITEMS=kv-head`` builds the earlier
(sequence, KV head) items instead, the off switch. With 64-dim heads and a
bfloat16 cache those items multiply on AMX tiles where the CPU has them
(session 18); ``HAWKER_DECODE_ATTENTION_AMX=0`` builds without that path.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

from hawker.kernels.native import (
    DTYPE_CODES,
    FLOAT8_CACHE_CODES,
    CFunction,
    attention_inputs,
    define_op,
    int64_arrays,
    load_kernel_library,
    load_op_library,
)
from hawker.switches import switch_on

_LIBRARY = "paged_decode_attention"


ITEMS_VARIABLE = "HAWKER_DECODE_ATTENTION_ITEMS"
ITEMS_CHOICES = ("sequence", "kv-head")


def whole_sequence_items() -> bool:
    """Whether the kernel's work items are whole sequences (the default) or (sequence, KV head) pairs, as
    ``HAWKER_DECODE_ATTENTION_ITEMS`` says; an unknown value is a ValueError."""
    items = os.environ.get(ITEMS_VARIABLE, ITEMS_CHOICES[0])
    if items not in ITEMS_CHOICES:
        raise ValueError(f"{ITEMS_VARIABLE}={items!r}: expected one of {', '.join(ITEMS_CHOICES)}")
    return items == ITEMS_CHOICES[0]


AMX_VARIABLE = "HAWKER_DECODE_ATTENTION_AMX"


def amx_tiles() -> bool:
    """Whether whole-sequence items of 64-dim heads multiply on AMX tiles where the CPU has them (the default;
    ``HAWKER_DECODE_ATTENTION_AMX=0`` builds the vector loops alone, the off switch; another value is a
    ValueError)."""
    return switch_on(AMX_VARIABLE)


def _kernel(
    group: int, head_dim: int, whole_sequences: bool | None = None, amx: bool | None = None
) -> CFunction | None:
    """The kernel built for ``group`` query heads per KV head of ``head_dim`` dims (its vector loops' shape), its
    work items as ``HAWKER_DECODE_ATTENTION_ITEMS`` says unless ``whole_sequences`` is given, AMX tiles as
    ``HAWKER_DECODE_ATTENTION_AMX`` says unless ``amx`` is given."""
    return _build_kernel(*_build_settings(group, head_dim, whole_sequences, amx))


def _build_settings(
    group: int, head_dim: int, whole_sequences: bool | None = None, amx: bool | None = None
) -> tuple[int, int, bool, bool]:
    """A build's shape and choices: those given, the environment's settings for the rest."""
    items = whole_sequence_items() if whole_sequences is None else whole_sequences
    return group, head_dim, items, amx_tiles() if amx is None else amx


def _defines(group: int, head_dim: int, whole_sequences: bool, amx: bool) -> tuple[tuple[str, int], ...]:
    return (
        ("HAWKER_GROUP", group),
        ("HAWKER_HEAD_DIM", head_dim),
        ("HAWKER_SEQUENCE_ITEMS", int(whole_sequences)),
        ("HAWKER_DECODE_AMX", int(amx)),
    )


@functools.cache
def _build_kernel(group: int, head_dim: int, whole_sequences: bool, amx: bool) -> CFunction | None:
    """The kernel for this shape of heads, its work items whole sequences or (sequence, KV head) pairs, with or
    without its AMX path."""
    library = load_kernel_library(_LIBRARY, _defines(group, head_dim, whole_sequences, amx))
    if library is None:
        return None
    function = library.hawker_paged_decode_attention
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [pointer] * 6 + [i64] * 7 + [ctypes.c_float] + [ctypes.c_int] * 3
    function.restype = ctypes.c_int
    return function


def multiplies_on_tiles(
    heads: int, kv_heads: int, head_dim: int, block_size: int, cache_dtype: torch.dtype = torch.bfloat16
) -> bool:
    """Whether bfloat16 decodes with these heads and cache blocks take the kernel's AMX path on this machine
    (as the settings build it)."""
    library = load_kernel_library(_LIBRARY, _defines(*_build_settings(heads // kv_heads, head_dim)))
    code = FLOAT8_CACHE_CODES.get(cache_dtype, DTYPE_CODES.get(cache_dtype))
    if library is None or code is None:
        return False
    tiles = library.hawker_paged_decode_attention_tiles
    tiles.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_int]
    return bool(tiles(heads, kv_heads, block_size, code))


OP = "hawker::paged_decode_attention"


@functools.cache
def _operator_library() -> ctypes.CDLL | None:
    """Registers the operator's CPU kernel once: the C++ one where it builds (returned: shapes are registered
    with it as they are built), else ``_run``."""
    library = load_op_library(f"{_LIBRARY}_op")
    if library is None:
        torch.library.impl(OP, "cpu", _run)
    return library


@functools.cache
def _operator_kernel(group: int, head_dim: int) -> bool:
    """The kernel for this shape of heads built and callable through the operator."""
    kernel = _kernel(group, head_dim)
    if kernel is None:
        return False
    library = _operator_library()
    if library is not None:
        register = library.hawker_register_paged_decode_attention
        register.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        register(group, head_dim, ctypes.cast(kernel, ctypes.c_void_p))
    return True


def available(dtype: torch.dtype, group: int, head_dim: int) -> bool:
    """The kernel built on this machine for this shape of heads and handles ``dtype``."""
    return dtype in DTYPE_CODES and _operator_kernel(group, head_dim)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q: [B, H, D] (rows may be strided); caches: [blocks, block_size, Hkv, D] of q's dtype or an 8-bit float;
    block_tables: [B, width] int64; context_lens: [B] int64, each >= 1. Returns [B, H, D].

    Every call goes through the op ``hawker::paged_decode_attention`` (one
    opaque node in a compiled graph), whose kernel for this shape of heads is built on first use."""
    if not torch.compiler.is_compiling() and not _operator_kernel(q.shape[1] // k_cache.shape[2], q.shape[2]):
        raise RuntimeError("the paged decode attention kernel is not built; check available() first")
    return torch.ops.hawker.paged_decode_attention.default(q, k_cache, v_cache, block_tables, context_lens, scale)


def _run(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    whole_sequences: bool | None = None,
    amx: bool | None = None,
) -> torch.Tensor:
    """The operator through ctypes; ``whole_sequences`` and ``amx`` pick a build (default: the settings')."""
    kernel = _kernel(q.shape[1] // k_cache.shape[2], q.shape[2], whole_sequences, amx)
    if kernel is None:
        raise RuntimeError("the paged decode attention kernel is not built; check available() first")
    q, cache_dtype = attention_inputs(q, k_cache, v_cache)
    tables, lens = int64_arrays(block_tables, context_lens)
    seqs, heads, dim = q.shape
    out = torch.empty((seqs, heads, dim), dtype=q.dtype)
    status = kernel(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        out.data_ptr(),
        tables.data_ptr(),
        lens.data_ptr(),
        seqs,
        tables.shape[1],
        q.stride(0),
        heads,
        k_cache.shape[2],
        dim,
        k_cache.shape[1],
        scale,
        DTYPE_CODES[q.dtype],
        cache_dtype,
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("paged decode attention could not allocate its scratch memory")
    return out


def _fake(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    # Tracing a compiled step (in any process, a distributed worker's too) passes here before the graph
    # runs: the shape's kernel must be registered with the C++ operator by then.
    _operator_kernel(int(q.shape[1]) // int(k_cache.shape[2]), int(q.shape[2]))
    return q.new_empty(q.shape)  # the shape and dtype a compiled graph sees


# A plain operator, not ``torch.library.custom_op``: that wrapper's checks cost ~17 us a call, 30 calls a
# decode step (benchmarks/NOTES.md). Its CPU kernel is registered by ``_operator_library``.
define_op(
    OP,
    "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, float scale) -> Tensor",
    _fake,
)
