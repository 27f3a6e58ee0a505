"""Triton prefill attention over block tables: the new tokens of each sequence attend
causally to its cached prefix (a prefix-cache hit or earlier chunks) and to themselves,
all read from the paged cache after this step's write (with a sliding window W, each
token to the W keys ending at its own). Any query length works, so a mixed batch of
decodes and prefill chunks runs in one launch.

Program (seq, kv head, q tile) packs BLOCK_Q tokens x the G query heads of one KV head
into the BLOCK_M rows of its tile (row r = token r // G, head r % G), so each K/V tile
read through the block table serves the whole group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmctl_kernels.decode_attention import LOG2E, attend_paged_tiles, dot_in_fp32, kernel_window


def prefill_config(max_query_len: int, queries_per_kv: int, device: torch.device) -> dict:
    """Row and key tile sizes: big tiles for long prompts, small ones when most rows idle."""
    if device.type != "cuda":
        return {"BLOCK_M": max(16, triton.next_power_of_2(queries_per_kv)), "BLOCK_N": 16, "num_warps": 4}
    rows = max_query_len * queries_per_kv
    block_m = 128 if rows >= 512 else 64 if rows >= 64 else 16
    block_m = max(block_m, triton.next_power_of_2(queries_per_kv))
    return {"BLOCK_M": block_m, "BLOCK_N": 64, "num_warps": 8 if block_m == 128 else 4, "num_stages": 2}


@triton.jit
def _paged_prefill_kernel(
    # pointers
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr,
    # sizes
    qk_scale, head_dim, window,
    # strides
    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch, stride_bt,
    # meta
    QUERIES_PER_KV: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_tile = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    # The grid is sized for the longest query in the batch.
    if q_tile * BLOCK_Q >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len

    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q_local = q_tile * BLOCK_Q + rows // QUERIES_PER_KV
    heads = kv_head * QUERIES_PER_KV + rows % QUERIES_PER_KV
    row_mask = (rows < BLOCK_Q * QUERIES_PER_KV) & (q_local < query_len)
    dim_mask = dims < head_dim
    q_mask = row_mask[:, None] & dim_mask[None, :]
    q_offs = (q_start + q_local).to(tl.int64)[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    q_pos = context_len + q_local  # absolute position of each row's token

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    # Keys from the last row's window start to the tile's first token are visible to all
    # its rows: whole tiles of them run unmasked. Before them (only with a window: keys
    # the first rows see and the last do not) and after them, the masks apply.
    first_pos = context_len + q_tile * BLOCK_Q
    kv_end = tl.minimum(seq_len, first_pos + BLOCK_Q)
    kv_start = tl.maximum(first_pos - window + 1, 0)
    shared_start = tl.maximum(kv_end - window, kv_start)
    full_end = shared_start + (tl.maximum(first_pos - shared_start, 0) // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = attend_paged_tiles(
        acc, l_i, m_i, q, q_pos, window, k_cache_ptr, v_cache_ptr, table, kv_head, head_dim, qk_scale,
        kv_start, shared_start, stride_cb, stride_cs, stride_ch, BLOCK_SIZE, BLOCK_D, BLOCK_N, True, DOT_FP32,
    )
    acc, l_i, m_i = attend_paged_tiles(
        acc, l_i, m_i, q, q_pos, window, k_cache_ptr, v_cache_ptr, table, kv_head, head_dim, qk_scale,
        shared_start, full_end, stride_cb, stride_cs, stride_ch, BLOCK_SIZE, BLOCK_D, BLOCK_N, False, DOT_FP32,
    )
    acc, l_i, m_i = attend_paged_tiles(
        acc, l_i, m_i, q, q_pos, window, k_cache_ptr, v_cache_ptr, table, kv_head, head_dim, qk_scale,
        full_end, kv_end, stride_cb, stride_cs, stride_ch, BLOCK_SIZE, BLOCK_D, BLOCK_N, True, DOT_FP32,
    )

    # Every real row sees its own key; rows past the query (not stored) may see none.
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_offs = (q_start + q_local).to(tl.int64)[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptr + o_offs, acc.to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_prefill_attention(
    q: torch.Tensor,  # [T, H, Dh], new tokens of B sequences in order
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32, context length including the new tokens
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,  # [*q.shape], written in full when given
    sliding_window: int | None = None,  # keys a token sees, itself included; None: all
) -> torch.Tensor:
    """-> [T, H, Dh] in q's dtype. The new tokens' K/V must already be in the cache."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    assert k_cache.shape[3] == head_dim and v_cache.shape == k_cache.shape, (
        f"cache {tuple(k_cache.shape)} does not hold head_dim {head_dim}"
    )
    assert num_heads % num_kv_heads == 0, f"{num_heads} heads not a multiple of {num_kv_heads} KV heads"
    assert block_tables.shape[0] == num_seqs and query_start_loc.shape == (num_seqs + 1,)
    assert block_tables.dtype == query_start_loc.dtype == seq_lens.dtype == torch.int32
    assert q.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {q.dtype}"
    queries_per_kv = num_heads // num_kv_heads
    config = prefill_config(max_query_len, queries_per_kv, q.device)
    block_q = config["BLOCK_M"] // queries_per_kv
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1
    if num_tokens == 0:
        return out
    grid = (num_seqs, num_kv_heads, triton.cdiv(max_query_len, block_q))
    _paged_prefill_kernel[grid](
        out, q, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
        scale * LOG2E, head_dim, kernel_window(sliding_window),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        QUERIES_PER_KV=queries_per_kv, BLOCK_SIZE=block_size, BLOCK_M=config["BLOCK_M"], BLOCK_Q=block_q,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_N=config["BLOCK_N"],
        DOT_FP32=dot_in_fp32(q, k_cache),
        num_warps=config["num_warps"], num_stages=config.get("num_stages", 1),
    )
    return out
