"""Triton helpers of the checkpoint layout's kernels (GPTQ's own qweight [K*bits/32, N]): load a
tile of packed words, split them into codes, and dequantize them (fp32, or exact q - z in half
precision for the tensor cores)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmctl_kernels.w4a16.common import half_pair, scale_and_zero
from llmctl_kernels.w4a16.config import KernelConfig
from llmctl_kernels.w4a16.layout import W4A16Weights
from llmctl_kernels.w4a16.ptx import NIBBLES_TO_BF16, NIBBLES_TO_FP16


@triton.jit
def load_words(qweight_ptr, k0, k_end, offs_n, n_mask, N,
                BITS: tl.constexpr, BLOCK_K: tl.constexpr, PACKED_LOAD: tl.constexpr):
    """The int32 words behind W[k0:k0+BLOCK_K, offs_n]; k0 and k_end are multiples of 32/BITS."""
    VALS: tl.constexpr = 32 // BITS
    if PACKED_LOAD:
        rows = k0 // VALS + tl.arange(0, BLOCK_K // VALS)
        w = tl.load(qweight_ptr + rows[:, None] * N + offs_n[None, :],
                    mask=(rows * VALS < k_end)[:, None] & n_mask[None, :], other=0, eviction_policy="evict_first")
    else:
        # Each word is loaded VALS times; the repeats hit L1 and keep the tile in one layout.
        ks = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(qweight_ptr + (ks // VALS)[:, None] * N + offs_n[None, :],
                    mask=(ks < k_end)[:, None] & n_mask[None, :], other=0)
    return w


@triton.jit
def unpack_codes(w, BITS: tl.constexpr, BLOCK_K: tl.constexpr, PACKED_LOAD: tl.constexpr):
    """The integer codes of `_load_words`' words: [BLOCK_K, BLOCK_N]."""
    VALS: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    if PACKED_LOAD:
        # Split each word in registers: [BLOCK_K/VALS, VALS, BLOCK_N] -> [BLOCK_K, BLOCK_N].
        shifts = tl.arange(0, VALS) * BITS
        q = tl.reshape((w[:, None, :] >> shifts[None, :, None]) & MASK, [BLOCK_K, w.shape[1]])
    else:
        # one word per k (tile starts are multiples of VALS): code k % VALS of it
        ks = tl.arange(0, BLOCK_K)
        q = (w >> ((ks % VALS) * BITS)[:, None]) & MASK
    return q


@triton.jit
def codes_fp32(w, BITS: tl.constexpr, BLOCK_K: tl.constexpr, PACKED_LOAD: tl.constexpr, big_bits):
    """The codes of `_load_words`' words as the fp32 2**23 + q: [BLOCK_K, BLOCK_N]."""
    q = unpack_codes(w, BITS, BLOCK_K, PACKED_LOAD)
    return (q | big_bits).to(tl.float32, bitcast=True)  # big_bits: 2**23 (see common.BITS_OF_2_23)


@triton.jit
def dequant_words(w, scales_ptr, qzeros_ptr, g_idx_ptr, k0, k_end, offs_n, n_mask, N, big_bits,
                   BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr,
                   HAS_G_IDX: tl.constexpr, BLOCK_K: tl.constexpr, PACKED_LOAD: tl.constexpr):
    """The fp32 weight tile W[k0:k0+BLOCK_K, offs_n] from `_load_words`' words: [BLOCK_K, BLOCK_N]."""
    q = codes_fp32(w, BITS, BLOCK_K, PACKED_LOAD, big_bits)
    ks = k0 + tl.arange(0, BLOCK_K)
    k_mask = ks < k_end
    if HAS_G_IDX:
        g = tl.load(g_idx_ptr + ks, mask=k_mask, other=0)[:, None]
        s_mask = k_mask[:, None] & n_mask[None, :]
    elif GROUP_SIZE % BLOCK_K == 0:
        # The whole tile lies in one group (k0 is a multiple of BLOCK_K): one row of scales.
        g = tl.zeros([1, 1], dtype=tl.int32) + k0 // GROUP_SIZE
        s_mask = n_mask[None, :]
    else:
        g = (ks // GROUP_SIZE)[:, None]
        s_mask = k_mask[:, None] & n_mask[None, :]
    s, zm = scale_and_zero(scales_ptr, qzeros_ptr, g, offs_n[None, :], s_mask, N, BITS, ZERO_OFFSET)
    return (q - zm) * s


@triton.jit
def codes_minus_zero_pairs(w, z, half_magic: tl.constexpr, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr,
                            ASM: tl.constexpr):
    """The exact q - z of the four-bit words w [BLOCK_K/8, BLOCK_N] (z: fp32 [BLOCK_N]) in DTYPE:
    [BLOCK_K, BLOCK_N]. Each word's eight codes stay in one thread (joined along a minor dim)."""
    if ASM:
        asm: tl.constexpr = NIBBLES_TO_FP16 if DTYPE == tl.float16 else NIBBLES_TO_BF16
        nz = (-(z + half_magic)).to(DTYPE)
        h0, h1, h2, h3, h4, h5, h6, h7 = tl.inline_asm_elementwise(
            asm, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [w, half_pair(nz, nz)[None, :]], dtype=(tl.int16,) * 8,
            is_pure=True, pack=1)
    else:
        h0 = nibble_minus_zero(w, z, DTYPE, 0)
        h1 = nibble_minus_zero(w, z, DTYPE, 1)
        h2 = nibble_minus_zero(w, z, DTYPE, 2)
        h3 = nibble_minus_zero(w, z, DTYPE, 3)
        h4 = nibble_minus_zero(w, z, DTYPE, 4)
        h5 = nibble_minus_zero(w, z, DTYPE, 5)
        h6 = nibble_minus_zero(w, z, DTYPE, 6)
        h7 = nibble_minus_zero(w, z, DTYPE, 7)
    # Nested joins: the last join is the most minor index, so code j lands at 4*d1 + 2*d2 + d3.
    even = tl.join(tl.join(h0, h4), tl.join(h2, h6))
    odd = tl.join(tl.join(h1, h5), tl.join(h3, h7))
    codes = tl.reshape(tl.join(even, odd), [w.shape[0], w.shape[1], 8])  # [BLOCK_K/8, BLOCK_N, 8]
    codes = tl.reshape(tl.permute(codes, (0, 2, 1)), [BLOCK_K, w.shape[1]])
    return codes.to(DTYPE, bitcast=True)


@triton.jit
def nibble_minus_zero(w, z, DTYPE: tl.constexpr, j: tl.constexpr):
    """Code j of each word minus z as the bits of a DTYPE number (portable form of the PTX above)."""
    return (((w >> (4 * j)) & 15).to(tl.float32) - z[None, :]).to(DTYPE).to(tl.int16, bitcast=True)


@triton.jit
def codes_as_half(w, half_bits, BITS: tl.constexpr, BLOCK_K: tl.constexpr, PACKED_LOAD: tl.constexpr,
                   DTYPE: tl.constexpr):
    """The codes of W[k0:k0+BLOCK_K, :] as exact half-precision numbers MAGIC + q: one shift and
    one AND-OR per code put q in the mantissa of MAGIC (half_bits: 1024.0 in fp16, 128.0 in bf16)."""
    q = unpack_codes(w, BITS, BLOCK_K, PACKED_LOAD)
    return (q | half_bits).to(tl.int16).to(DTYPE, bitcast=True)


@triton.jit
def dequant_tile(qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, k0, k_end, offs_n, n_mask, N, big_bits,
                  BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr,
                  HAS_G_IDX: tl.constexpr, BLOCK_K: tl.constexpr, PACKED_LOAD: tl.constexpr):
    """Load and dequantize W[k0:k0+BLOCK_K, offs_n] in fp32."""
    w = load_words(qweight_ptr, k0, k_end, offs_n, n_mask, N, BITS, BLOCK_K, PACKED_LOAD)
    return dequant_words(w, scales_ptr, qzeros_ptr, g_idx_ptr, k0, k_end, offs_n, n_mask, N, big_bits,
                          BITS, GROUP_SIZE, ZERO_OFFSET, HAS_G_IDX, BLOCK_K, PACKED_LOAD)


def gather_x_up_front(x: torch.Tensor, w: W4A16Weights, config: KernelConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x, the permutation the kernel gathers through): act-order's x gathered once here unless
    config.GATHER_X asks the kernel to gather it (then x as given and w.perm)."""
    if w.perm is None or config.GATHER_X:
        return x, w.perm
    return x.index_select(1, w.perm), None


def optional_operands(w: W4A16Weights, perm: torch.Tensor | None, bias: torch.Tensor | None) -> tuple:
    """perm, g_idx and bias as the checkpoint layout's kernels take them: a tensor whatever the case
    (w.qweight stands in where the kernel's HAS_* flag says it is absent)."""
    return tuple(t if t is not None else w.qweight for t in (perm, w.g_idx, bias))
