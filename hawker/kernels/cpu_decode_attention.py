"""Decode attention that reads the paged KV cache in place on a CPU (``csrc/paged_decode_attention.c``).

The torch path gathers every decode's keys and values into a padded copy
and runs SDPA per length group; on a CPU that copy and the masked SDPA calls
dominate a batched decode step (benchmarks/NOTES.md). The C kernel walks each
sequence's block table instead: one call per layer for all decodes, no
padding, no copy. It is a torch custom op, so a ``torch.compile``'d decode
step calls it as one opaque kernel.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from hawker.kernels.native import DTYPE_CODES, attention_inputs, int64_arrays, load_kernel_library

_LIBRARY = "paged_decode_attention"


@functools.cache
def _kernel(group: int, head_dim: int) -> ctypes._CFuncPtr | None:
    """The kernel built for ``group`` query heads per KV head of ``head_dim`` dims (its vector loops' shape)."""
    library = load_kernel_library(_LIBRARY, (("HAWKER_GROUP", group), ("HAWKER_HEAD_DIM", head_dim)))
    if library is None:
        return None
    function = library.hawker_paged_decode_attention
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [pointer] * 6 + [i64] * 7 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def available(dtype: torch.dtype, group: int, head_dim: int) -> bool:
    """The kernel built on this machine for this shape of heads and handles ``dtype``."""
    return dtype in DTYPE_CODES and _kernel(group, head_dim) is not None


@torch.library.custom_op("hawker::paged_decode_attention", mutates_args=(), device_types="cpu")
def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q: [B, H, D] (rows may be strided); caches: [blocks, block_size, Hkv, D];
    block_tables: [B, width] int64; context_lens: [B] int64, each >= 1. Returns [B, H, D]."""
    kernel = _kernel(q.shape[1] // k_cache.shape[2], q.shape[2])
    if kernel is None:
        raise RuntimeError("the paged decode attention kernel is not built; check available() first")
    q = attention_inputs(q, k_cache, v_cache)
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
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("paged decode attention could not allocate its scratch memory")
    return out


@paged_decode_attention.register_fake
def _(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return q.new_empty(q.shape)  # the shape and dtype a compiled graph sees
