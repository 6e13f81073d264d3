"""Paged attention in plain PyTorch (CPU, and the GPU reference).

New keys/values of the whole step are written into the cache first, so any
read after that sees every token of the step. Decodes run the in-place C
kernel on a CPU where it builds (one call for all of them), else a few padded
SDPA calls grouped by context length; prefill chunks likewise run the
in-place prefill kernel (one call for all of them), else one SDPA call each
(their lengths vary too much to pad together cheaply).

An 8-bit cache (``kv_cache_dtype``) keeps the step's keys and values rounded
to it, and every path attends to those rounded values, the step's own tokens
included: a token's numbers are then the same whether its context was just
computed or read back from the cache (a prefix-cache hit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from hawker.kernels.cpu_decode_attention import paged_decode_attention
from hawker.kernels.cpu_prefill_attention import paged_prefill_attention

if TYPE_CHECKING:
    from hawker.attention.metadata import AttentionMetadata, DecodeGroup, PagedPrefill, PrefillChunk


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """Write the step's keys and values; rows past ``slots`` are padding (consistent numerics) and are not kept.

    An 8-bit cache takes them rounded (exact when they already are)."""
    real = slots.shape[0]
    for new, cache in ((k[:real], k_cache), (v[:real], v_cache)):
        new = _saturated(new, cache.dtype)
        if cache.element_size() == 1:  # torch's CPU index_copy_ has no 8-bit floats: copy their bytes
            new, cache = new.view(torch.uint8), cache.view(torch.uint8)
        cache.view(-1, *cache.shape[-2:]).index_copy_(0, slots, new)


def _saturated(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``; an 8-bit float saturates at its largest value (a plain cast would give NaN)."""
    if x.dtype == dtype:
        return x
    largest = torch.finfo(dtype).max
    return x.clamp(-largest, largest).to(dtype)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, Hkv, D]; caches: [blocks, block_size, Hkv, D] of q's dtype or an 8-bit float."""
    # Rounded once: the cache takes these as they are, and attention reads them widened back.
    kept_k, kept_v = _saturated(k, k_cache.dtype), _saturated(v, v_cache.dtype)
    write_kv(kept_k, kept_v, k_cache, v_cache, meta.slot_mapping)
    k, v = kept_k.to(k.dtype), kept_v.to(v.dtype)
    if meta.query_contexts is not None:
        return _each_query_alone(q, k_cache, v_cache, meta.query_contexts, scale)
    if not meta.prefills:
        # Decode-only step (the common one): no output buffer to assemble.
        return _decode(q, k_cache, v_cache, meta, scale)
    decodes = meta.num_decodes
    if meta.paged_prefill is not None and not decodes:  # a prefill-only forward: the kernel's output is it
        return _native_prefill(q, k_cache, v_cache, meta.paged_prefill, scale)
    # Zeros: rows past the last chunk are padding (consistent numerics) and must hold finite values.
    out = torch.zeros_like(q)
    if decodes:
        out[:decodes] = _decode(q[:decodes], k_cache, v_cache, meta, scale)
    if meta.paged_prefill is not None:
        out[decodes:] = _native_prefill(q[decodes:], k_cache, v_cache, meta.paged_prefill, scale)
        return out
    for chunk in meta.prefills:
        rows = slice(chunk.query_start, chunk.query_start + chunk.length)
        if meta.prefill_tile_rows:
            out[rows] = _prefill_tiled(
                q[rows], k[rows], v[rows], k_cache, v_cache, chunk, scale, meta.prefill_tile_rows
            )
        else:
            out[rows] = _prefill(q[rows], k[rows], v[rows], k_cache, v_cache, chunk, scale)
    return out


def _native_prefill(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, chunks: PagedPrefill, scale: float
) -> torch.Tensor:
    """Every prefill chunk in one call of the in-place kernel; rows in no chunk (padding) come out zero."""
    return paged_prefill_attention(
        q, k_cache, v_cache, chunks.block_tables, chunks.chunk_rows, chunks.chunk_lens, chunks.chunk_starts, scale
    )


def _each_query_alone(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, contexts: tuple[torch.Tensor, ...], scale: float
) -> torch.Tensor:
    """Batch-invariant attention: every query over exactly its own context, in float32.

    Each query's matmul and softmax shapes depend only on its position, so
    its result is the same whatever else is in the step (or in its chunk).
    """
    out = torch.empty_like(q)
    heads, dim = q.shape[1:]
    for row, slots in enumerate(contexts):
        keys = _gather(k_cache, slots, torch.float32)  # [Hkv, L, D]
        values = _gather(v_cache, slots, torch.float32)
        query = q[row].float().reshape(keys.shape[0], heads // keys.shape[0], dim)  # [Hkv, group, D]
        probs = torch.softmax(torch.matmul(query, keys.transpose(1, 2)) * scale, dim=-1)
        out[row] = torch.matmul(probs, values).reshape(heads, dim).to(q.dtype)
    return out


def _gather(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Keys or values at ``slots`` as [..., Hkv, len, D] in ``dtype`` (one index_select, then a view)."""
    heads, dim = cache.shape[-2:]
    rows = cache.view(-1, heads, dim).index_select(0, slots.reshape(-1)).to(dtype)
    return rows.view(*slots.shape, heads, dim).transpose(-3, -2)


def _decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    if meta.paged_decode is not None:
        tables = meta.paged_decode
        return paged_decode_attention(q, k_cache, v_cache, tables.block_tables, tables.context_lens, scale)
    if len(meta.decode_groups) == 1:
        # No slicing by the group's Python ints: a compiled decode step
        # (hawker/engine/compiled_decode.py) then depends on tensor shapes only.
        return _decode_group(q, k_cache, v_cache, meta.decode_groups[0], scale)
    parts = [
        _decode_group(q[group.first_row : group.first_row + group.num_rows], k_cache, v_cache, group, scale)
        for group in meta.decode_groups
    ]
    return torch.cat(parts)


def _decode_group(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: DecodeGroup, scale: float
) -> torch.Tensor:
    keys = _gather(k_cache, group.slots, q.dtype)
    values = _gather(v_cache, group.slots, q.dtype)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), keys, values, attn_mask=group.mask, scale=scale, enable_gqa=True
    )
    return out.squeeze(2)


def _prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    chunk: PrefillChunk,
    scale: float,
) -> torch.Tensor:
    # SDPA's CPU flash kernel takes only 4-D inputs; 3-D ones fall back to the
    # much slower math path, so every call here carries a batch dim of 1.
    query = q.transpose(0, 1).unsqueeze(0)
    if chunk.start_pos == 0:
        out = F.scaled_dot_product_attention(
            query,
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            is_causal=True,
            scale=scale,
            enable_gqa=True,
        )
        return out[0].transpose(0, 1)
    length = chunk.context_len
    assert chunk.context_slots is not None
    keys = _gather(k_cache, chunk.context_slots.unsqueeze(0), q.dtype)
    values = _gather(v_cache, chunk.context_slots.unsqueeze(0), q.dtype)
    key_pos = torch.arange(length, device=q.device)
    query_pos = torch.arange(chunk.start_pos, length, device=q.device)
    mask = (key_pos.unsqueeze(0) <= query_pos.unsqueeze(1))[None, None]
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def _prefill_tiled(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    chunk: PrefillChunk,
    scale: float,
    tile: int,
) -> torch.Tensor:
    """Prefill attention whose result for a query depends only on its position and the chunk's end.

    SDPA's CPU kernel blocks its work by the number of queries, so a prompt's
    last tokens come out differently when they are a whole prompt's tail (cold)
    or a short chunk after a prefix-cache hit. Here every call has the same
    shape for a given query position: queries on tiles of ``tile`` positions
    aligned to multiples of ``tile`` (missing rows are zero queries), each
    tile over the keys up to its last position, with an explicit causal mask.
    """
    end = chunk.context_len
    if chunk.start_pos == 0:
        keys, values = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, end, D]: the chunk is the whole context
    else:
        assert chunk.context_slots is not None
        keys = _gather(k_cache, chunk.context_slots, q.dtype)
        values = _gather(v_cache, chunk.context_slots, q.dtype)
    # Laid out [Hkv, end, D] once: each tile then attends to a view of the first
    # keys (SDPA takes strided heads) instead of copying them again, which made
    # the copies grow as end^2 / tile.
    keys, values = keys.contiguous(), values.contiguous()
    queries = q.transpose(0, 1)  # [H, length, D]
    out = torch.empty_like(queries)
    for tile_start in range(chunk.start_pos // tile * tile, end, tile):
        tile_end = min(tile_start + tile, end)
        first = max(tile_start, chunk.start_pos)  # the first real query of the tile
        padded = queries.new_zeros((queries.shape[0], tile, queries.shape[2]))
        padded[:, first - tile_start : tile_end - tile_start] = queries[
            :, first - chunk.start_pos : tile_end - chunk.start_pos
        ]
        # Padding rows past the end take the last position's mask, so no row is fully masked.
        query_pos = torch.arange(tile_start, tile_start + tile, device=q.device).clamp(max=tile_end - 1)
        mask = torch.arange(tile_end, device=q.device).unsqueeze(0) <= query_pos.unsqueeze(1)
        attended = F.scaled_dot_product_attention(
            padded.unsqueeze(0),
            keys[:, :tile_end].unsqueeze(0),
            values[:, :tile_end].unsqueeze(0),
            attn_mask=mask[None, None],
            scale=scale,
            enable_gqa=True,
        )[0]
        out[:, first - chunk.start_pos : tile_end - chunk.start_pos] = attended[
            :, first - tile_start : tile_end - tile_start
        ]
    return out.transpose(0, 1)
