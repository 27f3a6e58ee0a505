"""Tensor-core W4A16 GEMM over the fragment layout (layout.py): the product computed transposed,
out^T = W^T x^T, so the dequantized weight tile is the dot's left operand straight from the
registers its words were loaded into. Split-K fills the GPU at small M (scratch.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmctl_kernels.launch import interpreting, pdl_signal, pdl_wait
from llmctl_kernels.w4a16.common import scale_and_zero, store_output, tile_ranges
from llmctl_kernels.w4a16.config import KernelConfig
from llmctl_kernels.w4a16.frag_tiles import (
    frag_block_k,
    frag_launch_options,
    frag_weight_tile,
    load_frag_words,
    load_x,
    split_k_bounds,
)
from llmctl_kernels.w4a16.layout import W4A16Weights
from llmctl_kernels.w4a16.scratch import SplitKScratch, finish_split_k, gather_and_zero, split_k_target

# The tuner's candidates (tables.json records the winners per GPU).
FRAG_GEMM_CONFIGS = [
    dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, SCALE_IN_A=sa, num_warps=nw, num_stages=st)
    for bm, bn, bk, nw, st, sk, sa in (
        # decode: exact q - z on the tensor cores, scaled after the dot; split-K fills the GPU
        (16, 64, 128, 4, 4, 4, 0), (16, 64, 128, 4, 4, 8, 0), (16, 128, 128, 4, 4, 2, 0), (16, 128, 128, 4, 4, 4, 0),
        (16, 128, 128, 4, 4, 8, 0), (16, 128, 128, 8, 4, 4, 0), (32, 128, 128, 4, 3, 2, 0), (32, 128, 128, 4, 3, 4, 0),
        (32, 128, 128, 4, 3, 8, 0),
        (64, 64, 128, 4, 3, 2, 0), (64, 64, 128, 4, 3, 4, 0), (64, 128, 128, 4, 3, 2, 0), (64, 128, 128, 8, 3, 2, 0),
        # prefill: scaled weights, the dot accumulates in place
        (64, 128, 64, 4, 3, 2, 1), (64, 128, 128, 4, 3, 4, 1), (128, 128, 64, 8, 3, 1, 1), (128, 128, 64, 8, 3, 2, 1),
        (128, 128, 64, 8, 3, 4, 1), (128, 128, 128, 8, 3, 1, 1),
        (256, 128, 64, 8, 3, 1, 1), (256, 128, 64, 8, 3, 2, 1), (256, 128, 64, 8, 4, 3, 1),
    )
]


@triton.jit
def _frag_gemm_kernel(
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, bias_ptr, out_ptr,
    M, N, K, k_per_split, stride_xm, stride_om,
    GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_IN_A: tl.constexpr,
    ASM: tl.constexpr, EVICT: tl.constexpr, PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m, offs_n, m_mask, n_mask, k_start, k_end = tile_ranges(pid_m, pid_n, pid_k, M, N, K, k_per_split,
                                                                 BLOCK_M, BLOCK_N)
    pdl_wait(PDL)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    # Every tile lies in one group (GROUP_SIZE % BLOCK_K == 0). Its scales and zeros are loaded a
    # step ahead, into registers: the pipeliner leaves the 16-bit scale load synchronous, and
    # loaded where it is used it would stall every step for a DRAM round trip.
    s_next, zm_next = scale_and_zero(scales_ptr, qzeros_ptr, k_start // GROUP_SIZE, offs_n, n_mask, N, 4,
                                      ZERO_OFFSET)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = load_x(x_rows + ks[None, :], m_mask[:, None] & (ks < k_end)[None, :], 0.0, EVICT)
        w = load_frag_words(qweight_ptr, k0, k_end, pid_n, N, BLOCK_N, BLOCK_K, EVICT)
        s = s_next
        zm = zm_next
        # (the last step reloads the last group rather than read past the scales)
        g_next = tl.minimum(k0 + BLOCK_K, K - 1) // GROUP_SIZE
        s_next, zm_next = scale_and_zero(scales_ptr, qzeros_ptr, g_next, offs_n, n_mask, N, 4, ZERO_OFFSET)
        if ASM:
            wt = frag_weight_tile(w, zm, s, BLOCK_N, BLOCK_K, a.dtype, True, SCALE_IN_A)
            xt = tl.trans(a)
        else:
            # the interpreter's bf16 arithmetic is broken: fp32 operands, upcast right after loading
            wt = frag_weight_tile(w, zm, s, BLOCK_N, BLOCK_K, tl.float32, False, SCALE_IN_A)
            xt = tl.trans(a.to(tl.float32))  # (fp32 dots are exact in the interpreter)
        if SCALE_IN_A:
            # (large M) the dot accumulates in place and runs while the next tile is dequantized
            acc = tl.dot(wt, xt, acc)
        else:
            # (small M) exact q - z on the tensor cores, scaled per output feature after the dot
            acc += tl.dot(wt, xt) * s[:, None]
    # the next kernel launches while this one's programs finish (signalled at entry, its programs
    # would take SM slots beside ours and be placed unevenly)
    pdl_signal(PDL)
    acc = tl.trans(acc)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    store_output(acc, out_ptrs, m_mask[:, None] & n_mask[None, :], ATOMIC)


def frag_gemm(x: torch.Tensor, w: W4A16Weights, bias: torch.Tensor | None, out: torch.Tensor, config: KernelConfig,
              scratch: SplitKScratch | None) -> torch.Tensor:
    """Tensor-core GEMM over the fragment layout; x [M, K] in checkpoint order."""
    config.require("BLOCK_M", "BLOCK_N")
    assert w.layout == "frag", f"the fragment GEMM got {w.layout} weights"
    assert not config.GATHER_X, "the fragment GEMM gathers act-order's x up front only (GATHER_X=0)"
    m, k = x.shape
    n = w.out_features
    block_k = frag_block_k(w, config)
    k_per_split, split_k = split_k_bounds(k, config.SPLIT_K, block_k)
    grid = (triton.cdiv(n, config.BLOCK_N), split_k, triton.cdiv(m, config.BLOCK_M))
    launch = frag_launch_options(x)
    if w.perm is not None:
        # act-order: x gathered once up front, in the same launch that zeroes the split-K output
        # (on the H200 at M <= 64: 0.7-4.5 us over in-order weights, against 6-7.5 us with an
        # index_select and a memset; a gather inside the loop, 16-bit values that cannot be
        # copied asynchronously, was 1.5-15x slower)
        target = split_k_target(out, split_k, launch, scratch, zero_out=False)
        x = gather_and_zero(x, w.perm, target if split_k > 1 and target is out else None, m, k, n, launch)
    else:
        target = split_k_target(out, split_k, launch, scratch)
    _frag_gemm_kernel[grid](
        x, w.qweight, w.scales, w.qzeros, bias if bias is not None else w.scales, target,
        m, n, k, k_per_split, x.stride(0), target.stride(0),
        GROUP_SIZE=w.group_size, ZERO_OFFSET=w.zero_offset, HAS_BIAS=bias is not None, ATOMIC=split_k > 1,
        BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, BLOCK_K=block_k,
        SCALE_IN_A=bool(config.SCALE_IN_A), ASM=not interpreting(), EVICT=config.EVICT,
        num_warps=config.num_warps, num_stages=config.num_stages, **launch,
    )
    finish_split_k(target, out, launch, scratch)
    return out
