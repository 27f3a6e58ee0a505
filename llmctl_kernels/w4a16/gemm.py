"""Tiled W4A16 GEMM on tensor cores, with optional split-K for the mid-size M of batched decode.

Each program dequantizes a [BLOCK_K, BLOCK_N] weight tile in registers and feeds it to `tl.dot`
with a [BLOCK_M, BLOCK_K] activation tile. With SWAP_AB the product is computed transposed
(W^T x^T), so the dequantized tile is the left operand: Hopper's wgmma reads its left operand
from registers, and a small M becomes the cheap N side of the instruction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmctl_kernels.launch import interpreting
from llmctl_kernels.w4a16.common import BITS_OF_2_23, scale_and_zero, store_output, tile_ranges
from llmctl_kernels.w4a16.config import KernelConfig
from llmctl_kernels.w4a16.gptq_tiles import (
    codes_as_half,
    codes_fp32,
    codes_minus_zero_pairs,
    dequant_words,
    gather_x_up_front,
    load_words,
    optional_operands,
)
from llmctl_kernels.w4a16.layout import W4A16Weights
from llmctl_kernels.w4a16.scratch import SplitKScratch, finish_split_k, split_k_target

GEMM_CONFIGS = [
    dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, SWAP_AB=swap, GROUP_M=8, PACKED_LOAD=1, PREFETCH=pf,
         num_warps=nw, num_stages=st)
    for bm, bn, bk, nw, st, sk, swap, pf in (
        # batched decode: small M, split-K to fill the SMs
        (16, 64, 128, 4, 3, 4, 0, 0), (16, 64, 128, 4, 3, 8, 0, 0), (16, 64, 128, 4, 3, 8, 0, 1),
        (16, 128, 64, 4, 4, 4, 1, 0), (32, 128, 128, 4, 3, 4, 1, 0), (64, 64, 128, 4, 3, 1, 0, 0),
    )
] + [
    # exact codes on the tensor cores, zero and scale after the dot
    dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=128, SPLIT_K=4, SWAP_AB=1, GROUP_M=8, PACKED_LOAD=1, PREFETCH=0,
         num_warps=nw, num_stages=3, INT_DOT=1)
    for bm, nw in ((16, 8), (32, 4))
] + [
    # PAIRS: q - z built two codes per instruction (inline PTX), no correction after the dot
    dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, SWAP_AB=swap, GROUP_M=8, PACKED_LOAD=1, PREFETCH=0,
         num_warps=4, num_stages=st, INT_DOT=1, PAIRS=1)
    for bm, bn, bk, st, sk, swap in (
        (16, 128, 64, 4, 8, 1), (16, 128, 64, 4, 16, 1), (16, 64, 64, 4, 8, 1), (16, 64, 128, 3, 8, 1),
        (32, 64, 128, 3, 4, 1), (32, 64, 128, 3, 2, 1), (64, 64, 128, 3, 4, 1), (64, 64, 128, 3, 2, 1),
        (64, 128, 128, 3, 1, 0), (32, 128, 128, 3, 4, 1),
    )
] + [
    # prefill: large tiles
    dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1, SWAP_AB=swap, GROUP_M=8, PACKED_LOAD=1, PREFETCH=0,
         num_warps=nw, num_stages=st)
    for bm, bn, bk, nw, st, swap in (
        (128, 128, 64, 8, 3, 0), (128, 256, 64, 8, 3, 0), (128, 128, 128, 8, 2, 0),
        (256, 128, 64, 8, 3, 0), (64, 256, 64, 8, 3, 1), (128, 128, 64, 4, 4, 0),
    )
]


@triton.jit
def _load_x(x_rows, perm_ptr, k0, k_end, m_mask, HAS_PERM: tl.constexpr, BLOCK_K: tl.constexpr):
    ks = k0 + tl.arange(0, BLOCK_K)
    k_mask = ks < k_end
    if HAS_PERM:
        xk = tl.load(perm_ptr + ks, mask=k_mask, other=0)
    else:
        xk = ks
    return tl.load(x_rows + xk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)


@triton.jit
def _w4a16_gemm_kernel(
    # pointers
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, perm_ptr, g_idx_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, K, k_per_split, big_bits, half_bits,
    # strides
    stride_xm, stride_om,
    # meta
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_G_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    SWAP_AB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PACKED_LOAD: tl.constexpr, PREFETCH: tl.constexpr, INT_DOT: tl.constexpr,
    HALF_MAGIC: tl.constexpr, PAIRS: tl.constexpr, ONE_GROUP: tl.constexpr,
    ASM: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Grouped ordering: programs that run together share weight tiles in L2.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_id = pid // (GROUP_M * num_pid_n)
    first_m = group_id * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_rows)
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_rows
    offs_m, offs_n, m_mask, n_mask, k_start, k_end = tile_ranges(pid_m, pid_n, pid_k, M, N, K, k_per_split,
                                                                 BLOCK_M, BLOCK_N)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if PREFETCH:
        # Registers hold the next tiles while this one is multiplied.
        a_next = _load_x(x_rows, perm_ptr, k_start, k_end, m_mask, HAS_PERM, BLOCK_K)
        w_next = load_words(qweight_ptr, k_start, k_end, offs_n, n_mask, N, BITS, BLOCK_K, PACKED_LOAD)
    if ONE_GROUP:
        # Every tile lies in one group. Its row of scales and zeros is loaded a step ahead, into
        # registers: the pipeliner leaves the 16-bit scale load synchronous, and loaded where it is
        # used it would stall every step for a DRAM round trip.
        s_next, zm_next = scale_and_zero(scales_ptr, qzeros_ptr, k_start // GROUP_SIZE, offs_n, n_mask, N,
                                          BITS, ZERO_OFFSET)
    for k0 in range(k_start, k_end, BLOCK_K):
        if PREFETCH:
            a = a_next
            w = w_next
            a_next = _load_x(x_rows, perm_ptr, k0 + BLOCK_K, k_end, m_mask, HAS_PERM, BLOCK_K)
            w_next = load_words(qweight_ptr, k0 + BLOCK_K, k_end, offs_n, n_mask, N, BITS, BLOCK_K, PACKED_LOAD)
        else:
            a = _load_x(x_rows, perm_ptr, k0, k_end, m_mask, HAS_PERM, BLOCK_K)
            w = load_words(qweight_ptr, k0, k_end, offs_n, n_mask, N, BITS, BLOCK_K, PACKED_LOAD)
        if ONE_GROUP:
            s = s_next
            zm = zm_next
            # (the last step reloads the last group rather than read past the scales)
            g_next = tl.minimum(k0 + BLOCK_K, K - 1) // GROUP_SIZE
            s_next, zm_next = scale_and_zero(scales_ptr, qzeros_ptr, g_next, offs_n, n_mask, N, BITS, ZERO_OFFSET)
        if INT_DOT:
            # Exact integer codes on the tensor cores, the scale (and without PAIRS the zero point)
            # applied per column after the dot. zm is 2**23 + z (common.scale_and_zero).
            if PAIRS:
                # q - z exactly, two codes per instruction: the dot needs no correction
                qz = codes_minus_zero_pairs(w, zm - 8388608.0, HALF_MAGIC, BLOCK_K, a.dtype, ASM)
                if SWAP_AB:
                    acc += tl.dot(tl.trans(qz), tl.trans(a)) * s[:, None]
                else:
                    acc += tl.dot(a, qz) * s[None, :]
            else:
                # codes MAGIC + q; per column acc += s * (dot - (MAGIC + z) * sum(x))
                qh = codes_as_half(w, half_bits, BITS, BLOCK_K, PACKED_LOAD, a.dtype)
                z = zm - (8388608.0 - HALF_MAGIC)
                xs = tl.sum(a.to(tl.float32), axis=1)  # [BLOCK_M]
                if SWAP_AB:
                    d = tl.dot(tl.trans(qh), tl.trans(a))  # [BLOCK_N, BLOCK_M]
                    acc += (d - z[:, None] * xs[None, :]) * s[:, None]
                else:
                    d = tl.dot(a, qh)  # [BLOCK_M, BLOCK_N]
                    acc += (d - xs[:, None] * z[None, :]) * s[None, :]
        else:
            if ONE_GROUP:
                q = codes_fp32(w, BITS, BLOCK_K, PACKED_LOAD, big_bits)
                b = ((q - zm[None, :]) * s[None, :]).to(a.dtype)
            else:
                b = dequant_words(w, scales_ptr, qzeros_ptr, g_idx_ptr, k0, k_end, offs_n, n_mask, N, big_bits,
                                   BITS, GROUP_SIZE, ZERO_OFFSET, HAS_G_IDX, BLOCK_K, PACKED_LOAD).to(a.dtype)
            if SWAP_AB:
                acc = tl.dot(tl.trans(b), tl.trans(a), acc)
            else:
                acc = tl.dot(a, b, acc)
    if SWAP_AB:
        acc = tl.trans(acc)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    store_output(acc, out_ptrs, m_mask[:, None] & n_mask[None, :], SPLIT_K > 1)


def w4a16_gemm(
    x: torch.Tensor,  # [M, K] fp16/bf16, unit stride along K
    w: W4A16Weights,  # checkpoint layout
    bias: torch.Tensor | None,  # [N] or None
    out: torch.Tensor,  # [M, N] x.dtype; written, never read
    config: KernelConfig,
    scratch: SplitKScratch | None,
) -> torch.Tensor:
    """Launch the tiled GEMM (split-K when config.SPLIT_K > 1; llmctl_kernels/w4a16/scratch.py)."""
    config.require("BLOCK_M", "BLOCK_N", "BLOCK_K")
    assert w.layout == "gptq", f"the checkpoint-layout GEMM got {w.layout} weights"
    m, k = x.shape
    n = w.out_features
    block_k = config.BLOCK_K
    k_per_split = triton.cdiv(triton.cdiv(k, config.SPLIT_K), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    launch = {"PDL": False}
    target = split_k_target(out, split_k, launch, scratch)
    # One gather of x up front beats per-tile gathers of scattered columns inside the kernel.
    x, perm = gather_x_up_front(x, w, config)
    # fp16 holds 1024 + q exactly for q < 1024, bf16 128 + q for q < 128 (so up to 4-bit codes).
    half_magic = 1024 if x.dtype == torch.float16 else 128
    int_dot = (bool(config.INT_DOT) and w.g_idx is None and w.group_size % block_k == 0
               and (1 << w.bits) <= half_magic)
    grid = (triton.cdiv(m, config.BLOCK_M) * triton.cdiv(n, config.BLOCK_N), split_k)
    _w4a16_gemm_kernel[grid](
        x, w.qweight, w.scales, w.qzeros, *optional_operands(w, perm, bias), target,
        m, n, k, k_per_split, BITS_OF_2_23, 0x6400 if x.dtype == torch.float16 else 0x4300,
        x.stride(0), target.stride(0),
        BITS=w.bits, GROUP_SIZE=w.group_size, ZERO_OFFSET=w.zero_offset,
        HAS_PERM=perm is not None, HAS_G_IDX=w.g_idx is not None, HAS_BIAS=bias is not None,
        SPLIT_K=split_k, SWAP_AB=bool(config.SWAP_AB), BLOCK_M=config.BLOCK_M,
        BLOCK_N=config.BLOCK_N, BLOCK_K=block_k, GROUP_M=config.GROUP_M,
        PACKED_LOAD=bool(config.PACKED_LOAD), PREFETCH=bool(config.PREFETCH),
        INT_DOT=int_dot, HALF_MAGIC=half_magic, PAIRS=int_dot and w.bits == 4 and bool(config.PAIRS),
        ONE_GROUP=w.g_idx is None and w.group_size % block_k == 0,
        ASM=not interpreting(),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    finish_split_k(target, out, launch, scratch)
    return out
