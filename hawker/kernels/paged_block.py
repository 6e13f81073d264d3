"""The step both attention kernels share: one paged KV-cache block into an online softmax."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_cache_block(
    q,
    k_cache_ptr,
    v_cache_ptr,
    block,
    head_offset,
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
    PRECISION: tl.constexpr,
):
    """Fold cache ``block``'s keys/values (rows ``real_key`` of it) into the float32 online-softmax
    state of the queries ``q`` [rows, D]; ``visible`` [rows, block] (or broadcastable) masks scores.
    Every row must see at least one key of the first block it folds in (its max is then finite)."""
    offsets = block * stride_cache_block + slots[:, None] * stride_cache_slot + head_offset + dims[None, :]
    keys = tl.load(k_cache_ptr + offsets, mask=real_key[:, None], other=0.0)
    values = tl.load(v_cache_ptr + offsets, mask=real_key[:, None], other=0.0)
    scores = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * scale
    scores = tl.where(visible, scores, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(scores, 1))
    probs = tl.exp(scores - new_max[:, None])
    rescale = tl.exp(running_max - new_max)
    running_sum = running_sum * rescale + tl.sum(probs, 1)
    acc = acc * rescale[:, None] + tl.dot(probs.to(values.dtype), values, input_precision=PRECISION)
    return new_max, running_sum, acc
