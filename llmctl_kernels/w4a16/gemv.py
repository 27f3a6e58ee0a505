"""Split-K GEMV for W4A16 at small M: one activation row per program, no tensor cores.

Decode is memory-bound, so the kernel's only job is to keep enough packed-weight loads in flight:
the grid is (N / BLOCK_N) x SPLIT_K x M and each program streams a [BLOCK_KW, BLOCK_N] tile of
int32 words per step. The dequantized weight never leaves registers; partial sums of the SPLIT_K
programs meet as llmctl_kernels/w4a16/scratch.py says.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmctl_kernels.launch import interpreting
from llmctl_kernels.w4a16.common import (
    BITS_OF_2_23,
    BITS_OF_ONE,
    half_pair,
    magic_to_float,
    scale_and_zero,
    store_output,
)
from llmctl_kernels.w4a16.config import KernelConfig
from llmctl_kernels.w4a16.gptq_tiles import gather_x_up_front, optional_operands
from llmctl_kernels.w4a16.layout import W4A16Weights
from llmctl_kernels.w4a16.ptx import WORD_DOT_FP16
from llmctl_kernels.w4a16.scratch import SplitKScratch, finish_split_k, split_k_target

# The configurations the tuner sweeps (llmctl_kernels/w4a16/tables.json records the winners per GPU).
GEMV_CONFIGS = [
    dict(BLOCK_N=bn, BLOCK_KW=bkw, SPLIT_K=sk, PREFETCH=0, HALF2=h2, num_warps=nw, num_stages=1)
    for bn, bkw, nw in ((128, 16, 4), (256, 16, 4), (256, 8, 4), (512, 8, 4), (512, 8, 8), (128, 32, 8))
    for sk in (8, 16)
    for h2 in (1, 0)
] + [dict(BLOCK_N=256, BLOCK_KW=16, SPLIT_K=sk, PREFETCH=1, HALF2=0, num_warps=4, num_stages=1) for sk in (8, 16)]


@triton.jit
def _code_as_fraction(w, j: tl.constexpr, one_bits, BITS: tl.constexpr):
    """Code j of each word as the fp32 1 + q / 2**BITS: one shift and one AND-OR put the code in
    the top mantissa bits of 1.0 (exact, and no FSUB: the 1 is removed per row sum, not per weight)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    SHIFT: tl.constexpr = (23 - BITS) - j * BITS
    if SHIFT >= 0:
        t = w << SHIFT
    else:
        t = w >> (-SHIFT)  # arithmetic shift: the sign bits land above the kept field
    return ((t & (MASK << (23 - BITS))) | one_bits).to(tl.float32, bitcast=True)


@triton.jit
def _x_of_code(x_row, perm_ptr, rows, j: tl.constexpr, r_mask, VALS: tl.constexpr, HAS_PERM: tl.constexpr,
               EVEN: tl.constexpr, FP32: tl.constexpr = True):
    """x at code j of each word row (through perm with act-order), in fp32 (or x's dtype): [BLOCK_KW]."""
    k = rows * VALS + j
    if HAS_PERM:
        xk = tl.load(perm_ptr + k, mask=r_mask, other=0)
    else:
        xk = k
    if EVEN:
        xv = tl.load(x_row + xk)
    else:
        xv = tl.load(x_row + xk, mask=r_mask, other=0.0)
    return xv.to(tl.float32) if FP32 else xv


@triton.jit
def _word_dots_half2(w, x_row, perm_ptr, rows, r_mask, z, HAS_PERM: tl.constexpr, EVEN: tl.constexpr,
                     ASM: tl.constexpr):
    """sum_j x[8r + j] * (q_j - z) / 16 for every word w [BLOCK_KW, BLOCK_N] (4-bit, fp16 x): fp32."""
    if ASM:
        x0 = _x_of_code(x_row, perm_ptr, rows, 0, r_mask, 8, HAS_PERM, EVEN, False)
        x1 = _x_of_code(x_row, perm_ptr, rows, 1, r_mask, 8, HAS_PERM, EVEN, False)
        x2 = _x_of_code(x_row, perm_ptr, rows, 2, r_mask, 8, HAS_PERM, EVEN, False)
        x3 = _x_of_code(x_row, perm_ptr, rows, 3, r_mask, 8, HAS_PERM, EVEN, False)
        x4 = _x_of_code(x_row, perm_ptr, rows, 4, r_mask, 8, HAS_PERM, EVEN, False)
        x5 = _x_of_code(x_row, perm_ptr, rows, 5, r_mask, 8, HAS_PERM, EVEN, False)
        x6 = _x_of_code(x_row, perm_ptr, rows, 6, r_mask, 8, HAS_PERM, EVEN, False)
        x7 = _x_of_code(x_row, perm_ptr, rows, 7, r_mask, 8, HAS_PERM, EVEN, False)
        # -(64 + z/16) in both halves: (1024 + q)/16 - (64 + z/16) = (q - z)/16, exactly
        nz = (-(64.0 + z * 0.0625)).to(tl.float16)
        return tl.inline_asm_elementwise(
            WORD_DOT_FP16, "=f,r,r,r,r,r,r",
            [w, half_pair(nz, nz)[None, :], half_pair(x0, x4)[:, None], half_pair(x1, x5)[:, None],
             half_pair(x2, x6)[:, None], half_pair(x3, x7)[:, None]],
            dtype=tl.float32, is_pure=True, pack=1)
    # The same sum in fp32 (the interpreter cannot run PTX).
    dots = tl.zeros(w.shape, dtype=tl.float32)
    for j in tl.static_range(8):
        xv = _x_of_code(x_row, perm_ptr, rows, j, r_mask, 8, HAS_PERM, EVEN, True)
        q = ((w >> (4 * j)) & 15).to(tl.float32)
        dots += xv[:, None] * ((q - z[None, :]) * 0.0625)
    return dots


@triton.jit
def _gemv_tile(acc, w, rows, r0, r_mask, tile_mask, offs_n, n_mask, N, x_row, perm_ptr, g_idx_ptr,
               scales_ptr, qzeros_ptr, one_bits, big_bits, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
               ZERO_OFFSET: tl.constexpr, HAS_PERM: tl.constexpr, HAS_G_IDX: tl.constexpr,
               ONE_GROUP: tl.constexpr, EVEN: tl.constexpr, HALF2: tl.constexpr, ASM: tl.constexpr):
    """acc [BLOCK_KW, BLOCK_N] += x[rows' codes] * W[rows' codes, offs_n] for one tile of words w."""
    VALS: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    if ONE_GROUP:
        # sum_k x_k (q_k - z) = 2**BITS * sum_k x_k (1 + q_k / 2**BITS) - (2**BITS + z) * sum_k x_k:
        # per weight one shift, one AND-OR and one FMA; the zero point costs one FMA per word row.
        s = tl.load(scales_ptr + ((r0 * VALS) // GROUP_SIZE) * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zw = tl.load(qzeros_ptr + ((r0 * VALS) // GROUP_SIZE) * (N // VALS) + offs_n // VALS, mask=n_mask, other=0)
        z = ((zw >> ((offs_n % VALS) * BITS)) & MASK).to(tl.float32) + ZERO_OFFSET
        if HALF2:
            dots = _word_dots_half2(w, x_row, perm_ptr, rows, r_mask, z, HAS_PERM, EVEN, ASM)
            return acc + dots * (16.0 * s[None, :])
        z += 1 << BITS
        part = tl.zeros_like(acc)
        xs = tl.zeros([acc.shape[0]], dtype=tl.float32)
        for j in tl.static_range(VALS):
            xv = _x_of_code(x_row, perm_ptr, rows, j, r_mask, VALS, HAS_PERM, EVEN)
            xs += xv
            part += xv[:, None] * _code_as_fraction(w, j, one_bits, BITS)
        return acc + ((1 << BITS) * part - xs[:, None] * z[None, :]) * s[None, :]
    # Groups change inside the tile: scale and zero per code row.
    if not HAS_G_IDX:
        g = ((rows * VALS) // GROUP_SIZE)[:, None]
        s, zm = scale_and_zero(scales_ptr, qzeros_ptr, g, offs_n[None, :], tile_mask, N, BITS, ZERO_OFFSET)
    for j in tl.static_range(VALS):
        xv = _x_of_code(x_row, perm_ptr, rows, j, r_mask, VALS, HAS_PERM, EVEN)
        if HAS_G_IDX:
            g = tl.load(g_idx_ptr + rows * VALS + j, mask=r_mask, other=0)[:, None]
            s, zm = scale_and_zero(scales_ptr, qzeros_ptr, g, offs_n[None, :], tile_mask, N, BITS, ZERO_OFFSET)
        q = magic_to_float((w >> (j * BITS)) & MASK, big_bits)
        acc += xv[:, None] * ((q - zm) * s)
    return acc


@triton.jit
def _w4a16_gemv_kernel(
    # pointers
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, perm_ptr, g_idx_ptr, bias_ptr, out_ptr,
    # sizes
    N, K, rows_per_split, one_bits, big_bits,
    # strides
    stride_xm, stride_om,
    # meta
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_G_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    ONE_GROUP: tl.constexpr, EVEN: tl.constexpr, PREFETCH: tl.constexpr, HALF2: tl.constexpr, ASM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
):
    VALS: tl.constexpr = 32 // BITS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, BLOCK_KW)
    row_start = pid_k * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, K // VALS)
    x_row = x_ptr + pid_m * stride_xm
    w_ptrs = qweight_ptr + (row_start + offs_r)[:, None] * N + offs_n[None, :]
    if PREFETCH:
        # Registers hold the next tile while this one is reduced: two tiles in flight per program.
        w_next = tl.load(w_ptrs, mask=((row_start + offs_r) < row_end)[:, None] & n_mask[None, :], other=0,
                         eviction_policy="evict_first")
    acc = tl.zeros([BLOCK_KW, BLOCK_N], dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_KW):
        rows = r0 + offs_r
        r_mask = rows < row_end
        tile_mask = r_mask[:, None] & n_mask[None, :]
        if PREFETCH:
            w = w_next
            w_next = tl.load(w_ptrs + BLOCK_KW * N, mask=((rows + BLOCK_KW) < row_end)[:, None] & n_mask[None, :],
                             other=0, eviction_policy="evict_first")
        elif EVEN:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptrs, mask=tile_mask, other=0, eviction_policy="evict_first")
        w_ptrs += BLOCK_KW * N
        acc = _gemv_tile(acc, w, rows, r0, r_mask, tile_mask, offs_n, n_mask, N, x_row, perm_ptr, g_idx_ptr,
                         scales_ptr, qzeros_ptr, one_bits, big_bits, BITS, GROUP_SIZE, ZERO_OFFSET, HAS_PERM,
                         HAS_G_IDX, ONE_GROUP, EVEN, HALF2, ASM)
    out = tl.sum(acc, axis=0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        out += tl.where(pid_k == 0, bias, 0.0)
    store_output(out, out_ptr + pid_m * stride_om + offs_n, n_mask, SPLIT_K > 1)


def w4a16_gemv(
    x: torch.Tensor,  # [M, K] fp16/bf16, unit stride along K
    w: W4A16Weights,  # checkpoint layout
    bias: torch.Tensor | None,  # [N] or None
    out: torch.Tensor,  # [M, N] x.dtype; written, never read
    config: KernelConfig,
    scratch: SplitKScratch | None,
) -> torch.Tensor:
    """Launch the GEMV kernel; split-K partials meet as llmctl_kernels/w4a16/scratch.py says."""
    config.require("BLOCK_N", "BLOCK_KW")
    assert w.layout == "gptq", f"the checkpoint-layout GEMV got {w.layout} weights"
    m, k = x.shape
    n = w.out_features
    vals = 32 // w.bits
    block_kw = config.BLOCK_KW
    k_rows = k // vals
    rows_per_split = triton.cdiv(triton.cdiv(k_rows, config.SPLIT_K), block_kw) * block_kw
    split_k = triton.cdiv(k_rows, rows_per_split)
    launch = {"PDL": False}
    target = split_k_target(out, split_k, launch, scratch)
    # One gather of x up front (a tiny kernel) beats a perm load per code in the kernel.
    x, perm = gather_x_up_front(x, w, config)
    one_group = w.g_idx is None and w.group_size % (block_kw * vals) == 0
    grid = (triton.cdiv(n, config.BLOCK_N), split_k, m)
    _w4a16_gemv_kernel[grid](
        x, w.qweight, w.scales, w.qzeros, *optional_operands(w, perm, bias), target,
        n, k, rows_per_split, BITS_OF_ONE, BITS_OF_2_23,
        x.stride(0), target.stride(0),
        BITS=w.bits, GROUP_SIZE=w.group_size, ZERO_OFFSET=w.zero_offset,
        HAS_PERM=perm is not None, HAS_G_IDX=w.g_idx is not None, HAS_BIAS=bias is not None,
        SPLIT_K=split_k, ONE_GROUP=one_group,
        EVEN=n % config.BLOCK_N == 0 and k_rows % block_kw == 0, PREFETCH=bool(config.PREFETCH),
        HALF2=bool(config.HALF2) and one_group and w.bits == 4 and x.dtype == torch.float16,
        ASM=not interpreting(), BLOCK_N=config.BLOCK_N, BLOCK_KW=block_kw,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    finish_split_k(target, out, launch, scratch)
    return out
