"""Pieces every W4A16 kernel shares: scales and zero points of a group, exact int-to-float by a
magic number, packing two halves into one 32-bit word, a GEMM tile's ranges, and the store of a
(split-K) output tile."""

from __future__ import annotations

import triton
import triton.language as tl

# The bit patterns OR-ed into codes arrive as kernel arguments, not literals: in a register, the
# mask and the OR fuse into one LOP3 (an instruction takes one immediate, so two literals cost two
# LOP3s on the half-rate integer pipe, which bounds the GEMV).
BITS_OF_ONE = 0x3F800000  # 1.0f
BITS_OF_2_23 = 0x4B000000  # 2.0f ** 23


@triton.jit
def magic_to_float(q, big_bits):
    """Exact int -> fp32 without the quarter-rate I2F: OR the code into the mantissa of 2**23
    (big_bits). The caller subtracts 2**23 (folded into the zero point)."""
    return (q | big_bits).to(tl.float32, bitcast=True)


@triton.jit
def scale_and_zero(scales_ptr, qzeros_ptr, g, offs_n, mask, N, BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr):
    """Scales and zero points (plus 2**23) of groups g for columns offs_n, in fp32."""
    VALS: tl.constexpr = 32 // BITS
    s = tl.load(scales_ptr + g * N + offs_n, mask=mask, other=0.0).to(tl.float32)
    zw = tl.load(qzeros_ptr + g * (N // VALS) + offs_n // VALS, mask=mask, other=0)
    zm = ((zw >> ((offs_n % VALS) * BITS)) & ((1 << BITS) - 1)).to(tl.float32) + (ZERO_OFFSET + 8388608.0)
    return s, zm


@triton.jit
def half_pair(lo, hi):
    """The 16-bit values lo and hi packed as one 32-bit pair pattern (lo in the low half)."""
    lo_bits = lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi_bits = hi.to(tl.int16, bitcast=True).to(tl.int32)
    return lo_bits | (hi_bits << 16)


@triton.jit
def tile_ranges(pid_m, pid_n, pid_k, M, N, K, k_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A GEMM program's rows and features (offsets and in-range masks) and its split's K range."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = pid_k * k_per_split
    return offs_m, offs_n, offs_m < M, offs_n < N, k_start, tl.minimum(k_start + k_per_split, K)


@triton.jit
def store_output(out, out_ptrs, mask, ATOMIC: tl.constexpr):
    """Store a program's fp32 output tile; with split-K the partial sums meet through atomic adds
    into the zeroed target of llmctl_kernels/w4a16/scratch.py. (A scratch buffer with per-tile arrival
    counters, the last split adding the partials, needs no zeroing launch but measured slower on
    the H200: docs/benchmarks.md.)"""
    if ATOMIC:
        tl.atomic_add(out_ptrs, out.to(out_ptrs.dtype.element_ty), mask=mask, sem="relaxed")
    else:
        tl.store(out_ptrs, out.to(out_ptrs.dtype.element_ty), mask=mask)
