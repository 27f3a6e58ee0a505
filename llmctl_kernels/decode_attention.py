"""Triton decode attention over block tables (one new token per sequence), GQA-aware and
split-K (flash-decoding): program (seq, kv head, split) runs an fp32 online softmax for
all query heads of its group over one slice of the context, read through the block
table; a second kernel merges the slices by their log-sum-exp. With a sliding window
the slices cover only the window's keys."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from llmctl_kernels.launch import interpreting, launch_options, pdl_wait

LOG2E = 1.4426950408889634
# A slice shorter than this costs more to merge than it saves in parallelism.
MIN_TOKENS_PER_SPLIT = 128
MAX_SPLITS = 32
# The window of a model without one: wider than any context (and still an int32).
NO_WINDOW = 1 << 30


def dot_in_fp32(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Tensor-core dots in the input dtype on the GPU; fp32 where the interpreter's half
    arithmetic is wrong, for fp32 inputs and when q and the cache disagree."""
    return interpreting() or q.dtype == torch.float32 or q.dtype != k_cache.dtype


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_config(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> dict:
    """Block sizes and the number of context slices: enough programs to fill the GPU."""
    if device.type == "cuda":
        target = 2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
        # Two stages keep one 64-token K/V tile in flight (cp.async) while the other is used.
        block_n, num_warps, num_stages = 64, 4, 2
    else:
        target, block_n, num_warps, num_stages = 1, 16, 4, 1
    by_occupancy = triton.cdiv(target, num_seqs * num_kv_heads)
    by_length = triton.cdiv(max_seq_len, MIN_TOKENS_PER_SPLIT)
    num_splits = max(1, min(by_occupancy, by_length, MAX_SPLITS))
    return {"num_splits": num_splits, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages}


def kernel_window(sliding_window: int | None) -> int:
    """The kernels' `window` argument: keys a token sees, itself included."""
    assert sliding_window is None or sliding_window > 0, f"sliding window {sliding_window} must be positive"
    return NO_WINDOW if sliding_window is None else min(sliding_window, NO_WINDOW)


@triton.jit
def attend_paged_tiles(
    acc, l_i, m_i, q, q_pos, window,
    k_cache_ptr, v_cache_ptr, table_ptr, kv_head, head_dim, qk_scale, lo, hi,
    stride_cb, stride_cs, stride_ch,
    BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Online-softmax step over keys lo..hi-1 of one sequence, read through its block
    table. Rows of q see keys q_pos - window + 1 .. q_pos; MASKED=False promises every
    key in range is visible to every row and lo..hi is whole tiles, so the bulk of the
    context runs without masks. acc [M, D], l_i / m_i [M] (log2 units) are carried in
    fp32; a row that has seen no key yet keeps m_i = -inf, l_i = 0."""
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    for tile in range(lo, hi, BLOCK_N):
        pos = tile + tl.arange(0, BLOCK_N)
        if MASKED:
            pos_mask = pos < hi
            block = tl.load(table_ptr + pos // BLOCK_SIZE, mask=pos_mask, other=0).to(tl.int64)
            kv_mask = pos_mask[:, None] & dim_mask[None, :]
        else:
            block = tl.load(table_ptr + pos // BLOCK_SIZE).to(tl.int64)
            kv_mask = dim_mask[None, :]
        kv_offs = block * stride_cb + (pos % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
        k = tl.load(k_cache_ptr + kv_offs[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_offs[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if DOT_FP32:  # fp32 products (tensor cores would round fp32 inputs to tf32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [M, N], log2 units
        else:
            s = tl.dot(q, tl.trans(k)) * qk_scale
        if MASKED:
            visible = (pos[None, :] <= q_pos[:, None]) & (pos[None, :] > q_pos[:, None] - window)
            s = tl.where(visible & pos_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:  # a row with no visible key so far: exp2(-inf - 0) = 0, not NaN
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _paged_decode_kernel(
    # pointers
    out_ptr, part_out_ptr, part_lse_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    # sizes
    qk_scale, head_dim, tokens_per_split, window,
    # strides
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
    # meta
    QUERIES_PER_KV: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DOT_FP32: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait(PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    # The slices tile the keys the new token sees: the last `window` of the context.
    start = tl.maximum(seq_len - window, 0) + split * tokens_per_split
    end = tl.minimum(seq_len, start + tokens_per_split)

    groups = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    heads = kv_head * QUERIES_PER_KV + groups
    head_mask = groups < QUERIES_PER_KV
    dim_mask = dims < head_dim
    q_offs = seq.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_offs, mask=head_mask[:, None] & dim_mask[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    # Whole tiles unmasked, then the ragged tail, where every row sees keys up to end - 1.
    q_pos = tl.zeros([BLOCK_G], tl.int32) + end - 1
    full_end = start + (tl.maximum(end - start, 0) // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = attend_paged_tiles(
        acc, l_i, m_i, q, q_pos, window, k_cache_ptr, v_cache_ptr, table, kv_head, head_dim, qk_scale,
        start, full_end, stride_cb, stride_cs, stride_ch, BLOCK_SIZE, BLOCK_D, BLOCK_N, False, DOT_FP32,
    )
    acc, l_i, m_i = attend_paged_tiles(
        acc, l_i, m_i, q, q_pos, window, k_cache_ptr, v_cache_ptr, table, kv_head, head_dim, qk_scale,
        full_end, end, stride_cb, stride_cs, stride_ch, BLOCK_SIZE, BLOCK_D, BLOCK_N, True, DOT_FP32,
    )

    out_mask = head_mask[:, None] & dim_mask[None, :]
    # An empty slice (past this sequence's end) has l_i == 0: weight 0 in the merge.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    acc = acc / l_safe[:, None]
    if SPLIT:
        part = seq.to(tl.int64) * stride_pt + heads * stride_ph + split * stride_ps
        tl.store(part_out_ptr + part[:, None] + dims[None, :], acc, mask=out_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        lse_offs = seq.to(tl.int64) * stride_lt + heads * stride_lh + split
        tl.store(part_lse_ptr + lse_offs, lse, mask=head_mask)
    else:
        o_offs = seq.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptr + o_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _merge_splits_kernel(
    # pointers
    out_ptr, part_out_ptr, part_lse_ptr,
    # sizes
    num_splits, head_dim,
    # strides
    stride_ot, stride_oh, stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
    # meta
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    split_mask = splits < num_splits
    part = seq.to(tl.int64) * stride_pt + head * stride_ph + splits * stride_ps
    lse_offs = seq.to(tl.int64) * stride_lt + head * stride_lh + splits
    lse = tl.load(part_lse_ptr + lse_offs, mask=split_mask, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))  # split 0 is never empty, so the max is finite
    weight = weight / tl.sum(weight, 0)
    mask = split_mask[:, None] & (dims < head_dim)[None, :]
    parts = tl.load(part_out_ptr + part[:, None] + dims[None, :], mask=mask, other=0.0)
    out = tl.sum(parts * weight[:, None], 0)
    o_offs = seq.to(tl.int64) * stride_ot + head * stride_oh + dims
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=dims < head_dim)


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, Dh], the one new token of each sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32, context length including the new token
    max_seq_len: int,
    scale: float,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,  # [*q.shape], written in full when given
    sliding_window: int | None = None,  # keys the new token sees, itself included; None: all
) -> torch.Tensor:
    """-> [B, H, Dh] in q's dtype. The new token's K/V must already be in the cache."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert k_cache.shape[3] == head_dim and v_cache.shape == k_cache.shape, (
        f"cache {tuple(k_cache.shape)} does not hold head_dim {head_dim}"
    )
    assert num_heads % num_kv_heads == 0, f"{num_heads} heads not a multiple of {num_kv_heads} KV heads"
    assert block_tables.shape[0] == num_seqs and seq_lens.shape == (num_seqs,)
    assert block_tables.dtype == seq_lens.dtype == torch.int32
    assert q.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {q.dtype}"
    window = kernel_window(sliding_window)
    max_keys = min(max_seq_len, window)  # keys one token attends to, at most
    config = decode_config(num_seqs, num_kv_heads, max_keys, q.device)
    num_splits = num_splits or config["num_splits"]
    block_n = config["BLOCK_N"]
    tokens_per_split = triton.cdiv(triton.cdiv(max(max_keys, 1), num_splits), block_n) * block_n
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1
    split = num_splits > 1
    # Per-slice outputs [B, H, S, Dh] (normalized) and log2-sum-exps [B, H, S].
    parts = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
    lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    launch = launch_options(q.device)
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        out, parts, lse, q, k_cache, v_cache, block_tables, seq_lens,
        scale * LOG2E, head_dim, tokens_per_split, window,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        parts.stride(0), parts.stride(1), parts.stride(2), lse.stride(0), lse.stride(1),
        QUERIES_PER_KV=num_heads // num_kv_heads, BLOCK_SIZE=block_size,
        BLOCK_G=max(16, triton.next_power_of_2(num_heads // num_kv_heads)), BLOCK_D=block_d,
        BLOCK_N=block_n, SPLIT=split, DOT_FP32=dot_in_fp32(q, k_cache),
        num_warps=config["num_warps"], num_stages=config["num_stages"], **launch,
    )
    if split:
        _merge_splits_kernel[(num_seqs, num_heads)](
            out, parts, lse, num_splits, head_dim,
            out.stride(0), out.stride(1), parts.stride(0), parts.stride(1), parts.stride(2),
            lse.stride(0), lse.stride(1),
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d, **launch,
        )
    return out
