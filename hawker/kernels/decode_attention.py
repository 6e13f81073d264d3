"""Decode attention over the paged KV cache, split along the context (flash-decoding).

One query token per sequence. A program handles one (sequence, KV head,
split): the query heads that share the KV head (grouped-query attention)
are processed together, so each key/value block is read once for all of
them. Splitting the context means one long sequence still spreads over many
programs; a second kernel merges the splits' partial results through their
log-sum-exp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hawker.kernels.paged_block import attend_cache_block

# The rows of a tl.dot operand must be at least 16.
_MIN_DOT_ROWS = 16


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    scale,
    blocks_per_split,
    stride_qb,
    stride_qh,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_table,
    stride_out_b,
    stride_out_h,
    stride_out_s,
    stride_lse_b,
    stride_lse_h,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context = tl.load(context_lens_ptr + seq)
    heads = kv_head * GROUP + tl.arange(0, GROUP_PAD)
    real_head = tl.arange(0, GROUP_PAD) < GROUP
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :], mask=real_head[:, None], other=0.0
    )
    running_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    running_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    slots = tl.arange(0, BLOCK_SIZE)
    first_block = split * blocks_per_split
    for step in range(0, blocks_per_split):
        block_index = first_block + step
        start = block_index * BLOCK_SIZE
        if start < context:
            block = tl.load(block_tables_ptr + seq * stride_table + block_index)
            valid = start + slots < context
            running_max, running_sum, acc = attend_cache_block(
                q,
                k_cache_ptr,
                v_cache_ptr,
                block,
                kv_head * stride_cache_head,
                slots,
                dims,
                valid,
                valid[None, :],
                stride_cache_block,
                stride_cache_slot,
                scale,
                running_max,
                running_sum,
                acc,
                PRECISION,
            )
    # A split past the end of the context saw nothing: weight 0 (lse = -inf) in the merge.
    seen = running_sum > 0
    out = tl.where(seen[:, None], acc / tl.where(seen, running_sum, 1.0)[:, None], 0.0)
    lse = tl.where(seen, running_max + tl.log(tl.where(seen, running_sum, 1.0)), float("-inf"))
    out_offsets = seq * stride_out_b + heads[:, None] * stride_out_h + split * stride_out_s + dims[None, :]
    tl.store(partial_out_ptr + out_offsets, out, mask=real_head[:, None])
    tl.store(partial_lse_ptr + seq * stride_lse_b + heads * stride_lse_h + split, lse, mask=real_head)


@triton.jit
def _merge_splits_kernel(
    partial_out_ptr,
    partial_lse_ptr,
    out_ptr,
    num_splits,
    stride_part_b,
    stride_part_h,
    stride_part_s,
    stride_lse_b,
    stride_lse_h,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    real = splits < num_splits
    lse = tl.load(partial_lse_ptr + seq * stride_lse_b + head * stride_lse_h + splits, mask=real, other=float("-inf"))
    weights = tl.exp(lse - tl.max(lse, 0))  # at least one split saw a key: the max is finite
    dims = tl.arange(0, HEAD_DIM)
    parts = tl.load(
        partial_out_ptr + seq * stride_part_b + head * stride_part_h + splits[:, None] * stride_part_s + dims[None, :],
        mask=real[:, None],
        other=0.0,
    )
    out = tl.sum(parts * weights[:, None], 0) / tl.sum(weights, 0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


def num_splits_for(batch: int, kv_heads: int, max_blocks: int, target_programs: int) -> int:
    """Splits per sequence so that about ``target_programs`` programs run (at least one block each)."""
    wanted = -(-target_programs // max(batch * kv_heads, 1))
    return max(1, min(wanted, max_blocks))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int,
) -> torch.Tensor:
    """q: [B, H, D]; caches: [blocks, block_size, Hkv, D]; block_tables: [B, max_blocks] int32;
    context_lens: [B] int32 (every one >= 1). Returns [B, H, D] in q's dtype."""
    batch, num_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // kv_heads
    blocks_per_split = -(-block_tables.shape[1] // num_splits)
    partial = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    if batch == 0:
        return out
    _decode_split_kernel[(batch, kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        partial,
        lse,
        scale,
        blocks_per_split,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        partial.stride(0),
        partial.stride(1),
        partial.stride(2),
        lse.stride(0),
        lse.stride(1),
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        GROUP=group,
        GROUP_PAD=max(_MIN_DOT_ROWS, triton.next_power_of_2(group)),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    _merge_splits_kernel[(batch, num_heads)](
        partial,
        lse,
        out,
        num_splits,
        partial.stride(0),
        partial.stride(1),
        partial.stride(2),
        lse.stride(0),
        lse.stride(1),
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        SPLITS_PAD=triton.next_power_of_2(num_splits),
    )
    return out
