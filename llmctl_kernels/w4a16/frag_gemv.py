"""CUDA-core W4A16 GEMV over the fragment layout (layout.py), one row of x per program, split-K:
fp16 x takes half2 products of code pairs (ptx.FRAG_DOT_FP16), bf16 x fp32 arithmetic."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmctl_kernels.launch import interpreting, pdl_signal, pdl_wait
from llmctl_kernels.w4a16.common import half_pair, scale_and_zero, store_output
from llmctl_kernels.w4a16.config import KernelConfig
from llmctl_kernels.w4a16.frag_tiles import (
    code_minus_zero,
    frag_block_k,
    frag_launch_options,
    load_frag_words,
    load_x,
    split_k_bounds,
    split_rows,
)
from llmctl_kernels.w4a16.layout import W4A16Weights
from llmctl_kernels.w4a16.ptx import FRAG_DOT_FP16
from llmctl_kernels.w4a16.scratch import SplitKScratch, finish_split_k, split_k_target

# The tuner's candidates (tables.json records the winners per GPU).
FRAG_GEMV_CONFIGS = [
    dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, GATHER_X=1, num_warps=nw, num_stages=1)
    for bn, bk, nw in ((128, 128, 4), (256, 64, 4), (256, 128, 4), (128, 256, 4), (512, 64, 8))
    for sk in (8, 16)
]


@triton.jit
def _x_k(k0, jhi: tl.constexpr, KB: tl.constexpr):
    """k = k0 + 64 kb + 16 kbi + 8 jhi + 2 lc, the first row of the x pair that a word's code
    pairs 2 jhi and 2 jhi + 1 meet: [KB, 1, 1, lc, kbi]."""
    return (k0 + 64 * tl.arange(0, KB)[:, None, None, None, None] + 16 * tl.arange(0, 4)[None, None, None, None, :]
            + 8 * jhi + 2 * tl.arange(0, 4)[None, None, None, :, None])


@triton.jit
def _x_at(x_row, perm_ptr, k, k_end, HAS_PERM: tl.constexpr, EVICT: tl.constexpr):
    """x at (prepared) rows k, through perm with act-order."""
    if HAS_PERM:
        src = tl.load(perm_ptr + k, mask=k < k_end, other=0)
    else:
        src = k
    return load_x(x_row + src, k < k_end, 0.0, EVICT)


@triton.jit
def _x_pairs(x_row, perm_ptr, k0, k_end, jhi: tl.constexpr, KB: tl.constexpr, HAS_PERM: tl.constexpr,
             EVICT: tl.constexpr):
    """(x[k], x[k+1]) as half2 words [KB, 1, 1, lc, kbi] (k from `_x_k`): one 32-bit load per pair,
    or two gathered halves with act-order."""
    k = _x_k(k0, jhi, KB)
    if HAS_PERM:
        return half_pair(_x_at(x_row, perm_ptr, k, k_end, True, EVICT),
                         _x_at(x_row, perm_ptr, k + 1, k_end, True, EVICT))
    return load_x(x_row.to(tl.pointer_type(tl.int32)) + k // 2, k < k_end, 0, EVICT)


@triton.jit
def _frag_gemv_kernel(
    x_ptr, perm_ptr, qweight_ptr, scales_ptr, qzeros_ptr, bias_ptr, out_ptr,
    N, K, k_per_split, stride_xm, stride_om,
    GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
    HAS_PERM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HALF2: tl.constexpr,
    EVICT: tl.constexpr, PDL: tl.constexpr,
):
    """out[m, n] = sum_k x[m, k] W[k, n] on the CUDA cores: one row of x per program, split-K."""
    NB: tl.constexpr = BLOCK_N // 16
    KB: tl.constexpr = BLOCK_K // 64
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    pdl_wait(PDL)
    # partial sums per word (per pair of words with HALF2), reduced once at the end
    ACC_W: tl.constexpr = 2 if HALF2 else 4
    acc_lo = tl.zeros([KB, NB, 8, 4, ACC_W], dtype=tl.float32)
    acc_hi = tl.zeros([KB, NB, 8, 4, ACC_W], dtype=tl.float32)
    x_row = x_ptr + pid_m * stride_xm
    for k0 in range(k_start, k_end, BLOCK_K):
        w = load_frag_words(qweight_ptr, k0, k_end, pid_n, N, BLOCK_N, BLOCK_K, EVICT)
        s, zm = scale_and_zero(scales_ptr, qzeros_ptr, k0 // GROUP_SIZE, offs_n, n_mask, N, 4, ZERO_OFFSET)
        s_lo, s_hi = split_rows(s, NB)
        z_lo, z_hi = split_rows(zm - 8388608.0, NB)
        if HALF2:
            nz_lo = (-(64.0 + z_lo * 0.0625)).to(tl.float16)
            nz_hi = (-(64.0 + z_hi * 0.0625)).to(tl.float16)
            # words and x pairs of kbi = 2i and 2i + 1 side by side: [KB, NB, lr, lc, 2]
            wa, wb = tl.split(tl.reshape(w, [KB, NB, 8, 4, 2, 2]))
            x0 = _x_pairs(x_row, perm_ptr, k0, k_end, 0, KB, HAS_PERM, EVICT)
            x1 = _x_pairs(x_row, perm_ptr, k0, k_end, 1, KB, HAS_PERM, EVICT)
            xa0, xb0 = tl.split(tl.reshape(x0, [KB, 1, 1, 4, 2, 2]))
            xa1, xb1 = tl.split(tl.reshape(x1, [KB, 1, 1, 4, 2, 2]))
            lo, hi = tl.inline_asm_elementwise(
                FRAG_DOT_FP16, "=f,=f,r,r,r,r,r,r,r,r",
                [wa, wb, half_pair(nz_lo, nz_lo)[None, :, :, None, None],
                 half_pair(nz_hi, nz_hi)[None, :, :, None, None], xa0, xa1, xb0, xb1],
                dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
            acc_lo += lo * (16.0 * s_lo)[None, :, :, None, None]
            acc_hi += hi * (16.0 * s_hi)[None, :, :, None, None]
        else:
            k_0 = _x_k(k0, 0, KB)
            k_1 = _x_k(k0, 1, KB)
            x00 = _x_at(x_row, perm_ptr, k_0, k_end, HAS_PERM, EVICT).to(tl.float32)
            x01 = _x_at(x_row, perm_ptr, k_0 + 1, k_end, HAS_PERM, EVICT).to(tl.float32)
            x10 = _x_at(x_row, perm_ptr, k_1, k_end, HAS_PERM, EVICT).to(tl.float32)
            x11 = _x_at(x_row, perm_ptr, k_1 + 1, k_end, HAS_PERM, EVICT).to(tl.float32)
            zl = z_lo[None, :, :, None, None]
            zh = z_hi[None, :, :, None, None]
            # nibble i: pair j = i % 4 (jhi = j // 2, row jlo = j % 2), h = i // 4
            lo = (code_minus_zero(w, 0, zl) * x00 + code_minus_zero(w, 4, zl) * x01
                  + code_minus_zero(w, 2, zl) * x10 + code_minus_zero(w, 6, zl) * x11)
            hi = (code_minus_zero(w, 1, zh) * x00 + code_minus_zero(w, 5, zh) * x01
                  + code_minus_zero(w, 3, zh) * x10 + code_minus_zero(w, 7, zh) * x11)
            acc_lo += lo * s_lo[None, :, :, None, None]
            acc_hi += hi * s_hi[None, :, :, None, None]
    pdl_signal(PDL)  # as in the GEMM: the next kernel launches during this one's tail
    out_lo = tl.sum(tl.sum(tl.sum(acc_lo, axis=4), axis=3), axis=0)  # [NB, 8]
    out_hi = tl.sum(tl.sum(tl.sum(acc_hi, axis=4), axis=3), axis=0)
    out = tl.reshape(tl.permute(tl.join(out_lo, out_hi), (0, 2, 1)), [BLOCK_N])  # n = 16 nb + 8 jlo + lr
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        out += tl.where(pid_k == 0, bias, 0.0)
    store_output(out, out_ptr + pid_m * stride_om + offs_n, n_mask, ATOMIC)


def frag_gemv(x: torch.Tensor, w: W4A16Weights, bias: torch.Tensor | None, out: torch.Tensor, config: KernelConfig,
              scratch: SplitKScratch | None) -> torch.Tensor:
    """CUDA-core GEMV over the fragment layout (fp16 x: half2 products; bf16: fp32); x in checkpoint
    order (act-order: gathered through w.perm in the kernel, or up front with GATHER_X=0)."""
    config.require("BLOCK_N")
    assert w.layout == "frag", f"the fragment GEMV got {w.layout} weights"
    m, k = x.shape
    n = w.out_features
    block_k = frag_block_k(w, config)
    k_per_split, split_k = split_k_bounds(k, config.SPLIT_K, block_k)
    half2 = x.dtype == torch.float16 and not interpreting()
    launch = frag_launch_options(x)
    target = split_k_target(out, split_k, launch, scratch)
    grid = (triton.cdiv(n, config.BLOCK_N), split_k, m)
    # act-order: x gathered through perm in the kernel (saves the launch of a gather up front, 3-15%
    # at M=1 on the H200), or up front with GATHER_X=0
    perm = w.perm if config.GATHER_X else None
    if w.perm is not None and perm is None:
        x = x.index_select(1, w.perm)
    _frag_gemv_kernel[grid](
        x, perm if perm is not None else w.qweight, w.qweight, w.scales, w.qzeros,
        bias if bias is not None else w.scales, target, n, k, k_per_split, x.stride(0), target.stride(0),
        GROUP_SIZE=w.group_size, ZERO_OFFSET=w.zero_offset, HAS_BIAS=bias is not None, ATOMIC=split_k > 1,
        HAS_PERM=perm is not None,
        BLOCK_N=config.BLOCK_N, BLOCK_K=block_k, HALF2=half2, EVICT=config.EVICT,
        num_warps=config.num_warps, num_stages=config.num_stages, **launch,
    )
    finish_split_k(target, out, launch, scratch)
    return out
