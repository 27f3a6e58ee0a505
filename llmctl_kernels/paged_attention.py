"""Paged attention over a block-table KV cache: the pure-torch path (CPU and fallback),
and the Triton dispatch (cache write, then decode or prefill attention). Random batches and
the GPU self-check are in tests/ (paged_attention_helpers.py, paged_attention_selfcheck.py).

Cache layout, shared by every path (vLLM's, minus its x-packing of K):

    k_cache / v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    slot = block_id * block_size + offset      (the flattened [num_blocks * block_size] row)

    seq b, logical token t  ->  block block_tables[b, t // block_size], offset t % block_size

One step carries T new tokens of B sequences, flattened in order (query_start_loc). The
new tokens of seq b are its last query_len[b] positions: it had seq_lens[b] - query_len[b]
tokens cached before (a prefix-cache hit or earlier prefill chunks). Each new token
attends causally to every position up to its own, all read through the block table;
with a sliding window W (Mistral), only to the W positions ending at its own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def write_kv_cache_reference(
    k: torch.Tensor,  # [T, Hkv, Dh]
    v: torch.Tensor,  # [T, Hkv, Dh]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    slot_mapping: torch.Tensor,  # [T] int64
) -> None:
    """Scatter this step's K/V rows into their slots (in place)."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    slots = slot_mapping.to(torch.long)
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v.to(v_cache.dtype))


def _gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor, num_blocks: int) -> torch.Tensor:
    # cache: [NB, bs, Hkv, Dh], block_tables: [B, >=num_blocks] -> [B, Hkv, num_blocks*bs, Dh]
    ids = block_tables[:, :num_blocks]
    _, block_size, num_kv_heads, head_dim = cache.shape
    # index_select on the flat id list is ~2x faster than advanced indexing on the CPU.
    rows = cache.index_select(0, ids.reshape(-1).to(device=cache.device, dtype=torch.long))
    return rows.view(ids.shape[0], ids.shape[1] * block_size, num_kv_heads, head_dim).transpose(1, 2)


def _decode_reference(
    q: torch.Tensor,  # [B, H, Dh], one new token per sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    max_seq_len: int,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """All sequences at once: one padded gather, keys past each seq_len (and before its
    window) masked out."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_blocks = min(math.ceil(max_seq_len / block_size), block_tables.shape[1])
    keys = _gather_blocks(k_cache, block_tables, num_blocks)  # [B, Hkv, L, Dh]
    values = _gather_blocks(v_cache, block_tables, num_blocks)
    positions = torch.arange(num_blocks * block_size, device=q.device)
    ends = seq_lens.to(q.device)[:, None]
    mask = positions[None, :] < ends  # [B, L]
    if sliding_window is not None:
        mask &= positions[None, :] >= ends - sliding_window
    # The G query heads sharing a KV head act as G query rows of that head: no K/V repeat.
    group = q.reshape(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim).to(keys.dtype)
    out = F.scaled_dot_product_attention(group, keys, values, attn_mask=mask[:, None, None, :], scale=scale)
    return out.reshape(num_seqs, num_heads, head_dim)


def _prefill_one_reference(
    q: torch.Tensor,  # [Lq, H, Dh], the new tokens of one sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [max_blocks] int32
    seq_len: int,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One sequence: gather its whole context, causal mask shifted by the cached length
    (and limited to the window)."""
    query_len, num_heads, _ = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_blocks = math.ceil(seq_len / block_size)
    keys = _gather_blocks(k_cache, block_table[None], num_blocks)[:, :, :seq_len]  # [1, Hkv, L, Dh]
    values = _gather_blocks(v_cache, block_table[None], num_blocks)[:, :, :seq_len]
    queries = q.transpose(0, 1)[None].to(keys.dtype)  # [1, H, Lq, Dh]
    context_len = seq_len - query_len
    windowed = sliding_window is not None and seq_len > sliding_window
    mask = None
    if context_len > 0 or windowed:
        key_pos = torch.arange(seq_len, device=q.device)
        query_pos = context_len + torch.arange(query_len, device=q.device)
        mask = key_pos[None, :] <= query_pos[:, None]  # [Lq, L]
        if windowed:
            mask &= key_pos[None, :] > query_pos[:, None] - sliding_window
    out = F.scaled_dot_product_attention(
        queries, keys, values, attn_mask=mask, is_causal=mask is None, scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    )
    return out[0].transpose(0, 1)


def paged_attention_reference(
    q: torch.Tensor,  # [T, H, Dh]
    k: torch.Tensor,  # [T, Hkv, Dh]
    v: torch.Tensor,  # [T, Hkv, Dh]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    slot_mapping: torch.Tensor,  # [T] int64
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32, context length after this step
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    sliding_window: int | None = None,  # keys a token sees, itself included; None: all
) -> torch.Tensor:
    """Write k/v into the cache, then attend through the block tables -> [T, H, Dh].

    Decode sequences (one new token) go through one batched gather; sequences with
    several new tokens run one SDPA each with a causal mask offset by their cached length.
    """
    write_kv_cache_reference(k, v, k_cache, v_cache, slot_mapping)
    if max_query_len == 1:
        return _decode_reference(
            q, k_cache, v_cache, block_tables, seq_lens, max_seq_len, scale, sliding_window
        ).to(q.dtype)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    out = torch.empty_like(q)
    decodes = [b for b in range(len(lens)) if starts[b + 1] - starts[b] == 1]
    if decodes:
        rows = torch.tensor([starts[b] for b in decodes], device=q.device)
        picked = torch.tensor(decodes, device=block_tables.device)
        out[rows] = _decode_reference(
            q[rows], k_cache, v_cache, block_tables[picked], seq_lens[picked], max(lens[b] for b in decodes), scale,
            sliding_window,
        ).to(q.dtype)
    for b, seq_len in enumerate(lens):
        start, end = starts[b], starts[b + 1]
        if end - start > 1:
            out[start:end] = _prefill_one_reference(
                q[start:end], k_cache, v_cache, block_tables[b], seq_len, scale, sliding_window
            )
    return out


def paged_attention_triton(
    q: torch.Tensor,  # [T, H, Dh]
    k: torch.Tensor,  # [T, Hkv, Dh]
    v: torch.Tensor,  # [T, Hkv, Dh]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    slot_mapping: torch.Tensor,  # [T] int64
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32, context length after this step
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Same contract as `paged_attention_reference`, in Triton; no host synchronization."""
    from llmctl_kernels.cache_write import reshape_and_cache
    from llmctl_kernels.decode_attention import paged_decode_attention
    from llmctl_kernels.prefill_attention import paged_prefill_attention

    reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
    if max_query_len == 1:
        return paged_decode_attention(
            q, k_cache, v_cache, block_tables, seq_lens, max_seq_len, scale, sliding_window=sliding_window
        )
    return paged_prefill_attention(
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, max_query_len, scale,
        sliding_window=sliding_window,
    )

