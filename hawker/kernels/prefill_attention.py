"""Causal attention of variable-length query runs over the paged KV cache.

Serves prefill chunks and mixed batches: sequence ``s`` brings
``query_starts[s+1] - query_starts[s]`` query tokens (a whole prompt, a chunk
after a cached prefix, or a single decode token) at the end of its
``context_lens[s]`` cached tokens; this step's keys and values are in the
cache already. A program handles ``BLOCK_M`` queries of one query head of one
sequence and walks the sequence's cache blocks up to its causal limit, with
an online softmax in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hawker.kernels.paged_block import attend_cache_block


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    query_starts_ptr,
    context_lens_ptr,
    scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_table,
    BLOCK_M: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    tile = tl.program_id(2)
    query_start = tl.load(query_starts_ptr + seq)
    query_len = tl.load(query_starts_ptr + seq + 1) - query_start
    if tile * BLOCK_M < query_len:
        context = tl.load(context_lens_ptr + seq)
        prefix = context - query_len
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        real_row = rows < query_len
        query_pos = prefix + rows
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(
            q_ptr + (query_start + rows)[:, None] * stride_qt + head * stride_qh + dims[None, :],
            mask=real_row[:, None],
            other=0.0,
        )
        kv_head = head // GROUP
        running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        # Keys past the tile's last query are masked for every row: stop there.
        key_end = tl.minimum(prefix + (tile + 1) * BLOCK_M, context)
        slots = tl.arange(0, BLOCK_SIZE)
        for block_index in range(0, tl.cdiv(key_end, BLOCK_SIZE)):
            block = tl.load(block_tables_ptr + seq * stride_table + block_index)
            key_pos = block_index * BLOCK_SIZE + slots
            real_key = key_pos < context
            # Key 0 is visible to every row, so the first block makes every max finite.
            visible = real_key[None, :] & (key_pos[None, :] <= query_pos[:, None])
            running_max, running_sum, acc = attend_cache_block(
                q,
                k_cache_ptr,
                v_cache_ptr,
                block,
                kv_head * stride_cache_head,
                slots,
                dims,
                real_key,
                visible,
                stride_cache_block,
                stride_cache_slot,
                scale,
                running_max,
                running_sum,
                acc,
                PRECISION,
            )
        out = acc / running_sum[:, None]
        tl.store(
            out_ptr + (query_start + rows)[:, None] * stride_ot + head * stride_oh + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=real_row[:, None],
        )


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: torch.Tensor,
    context_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    block_m: int = 64,
) -> torch.Tensor:
    """q: [T, H, D] (the runs of all sequences, back to back); caches: [blocks, block_size, Hkv, D];
    block_tables: [S, max_blocks] int32; query_starts: [S + 1] int32; context_lens: [S] int32.
    Returns [T, H, D] in q's dtype."""
    tokens, num_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    num_seqs = context_lens.shape[0]
    if tokens == 0 or num_seqs == 0:
        return out
    grid = (num_seqs, num_heads, triton.cdiv(max_query_len, block_m))
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        query_starts,
        context_lens,
        scale,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        BLOCK_M=block_m,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        GROUP=num_heads // kv_heads,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out
