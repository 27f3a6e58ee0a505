"""Triton helpers of the fragment layout's kernels (layout.py describes the layout): load a
block of words, and turn them into the tensor cores' operand tile (exact q - z, optionally scaled)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmctl_kernels.launch import launch_options
from llmctl_kernels.w4a16.common import half_pair
from llmctl_kernels.w4a16.config import KernelConfig
from llmctl_kernels.w4a16.layout import FRAG_K, W4A16Weights
from llmctl_kernels.w4a16.ptx import FRAG_PAIRS_BF16, FRAG_PAIRS_FP16, FRAG_SCALED_BF16, FRAG_SCALED_FP16


@triton.jit
def split_rows(v, NB: tl.constexpr):
    """A per-feature vector [16 NB] as its values at rows lr and lr + 8 of each slab: two [NB, 8]."""
    return tl.split(tl.permute(tl.reshape(v, [NB, 2, 8]), (0, 2, 1)))


@triton.jit
def load_frag_words(qweight_ptr, k0, k_end, pid_n, N, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    EVICT: tl.constexpr):
    """The words of W[k0:k0+BLOCK_K, pid_n*BLOCK_N:...] as [KB, NB, lr, lc, kbi] (zero where masked);
    streamed once, so marked evict_first unless EVICT == 2 (KernelConfig.EVICT)."""
    NB: tl.constexpr = BLOCK_N // 16
    KB: tl.constexpr = BLOCK_K // 64
    nbs = pid_n * NB + tl.arange(0, NB)
    kbs = k0 // 64 + tl.arange(0, KB)
    mask = (kbs * 64 < k_end)[:, None, None] & (nbs < N // 16)[None, :, None]
    ptrs = qweight_ptr + kbs[:, None, None] * (N // 16 * 128) + nbs[None, :, None] * 128 + tl.arange(0, 128)[None, None, :]
    if EVICT == 2:
        w = tl.load(ptrs, mask=mask, other=0)
    else:
        w = tl.load(ptrs, mask=mask, other=0, eviction_policy="evict_first")
    return tl.reshape(w, [KB, NB, 8, 4, 4])


@triton.jit
def load_x(ptrs, mask, other, EVICT: tl.constexpr):
    """Activations (`other` where masked), read by every program of their rows: evict_last if EVICT == 1."""
    if EVICT == 1:
        return tl.load(ptrs, mask=mask, other=other, eviction_policy="evict_last")
    return tl.load(ptrs, mask=mask, other=other)


@triton.jit
def code_minus_zero(w, i: tl.constexpr, z):
    """Nibble i of each word minus z, in fp32 (the portable form of the PTX above)."""
    return ((w >> (4 * i)) & 15).to(tl.float32) - z


@triton.jit
def frag_tile(h0, h1, h2, h3, h4, h5, h6, h7, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Nibble i's values h_i [KB, NB, lr, lc, kbi] -> the tile W^T [BLOCK_N, BLOCK_K]. Each join
    appends a minor dim, so v is [kb, nb, lr, lc, kbi, h, jlo, jhi]; every permutation stays
    within a thread, and the result is the dot's operand layout."""
    v = tl.join(tl.join(tl.join(h0, h4), tl.join(h1, h5)), tl.join(tl.join(h2, h6), tl.join(h3, h7)))
    v = tl.permute(v, (1, 6, 2, 0, 4, 7, 3, 5))  # nb jlo lr | kb kbi jhi lc h
    return tl.reshape(v, [BLOCK_N, BLOCK_K])


@triton.jit
def frag_weight_tile(w, zm, s, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr,
                      ASM: tl.constexpr, SCALED: tl.constexpr):
    """The exact q - z of words w [KB, NB, lr, lc, kbi] (times the scales s if SCALED) as the
    DTYPE tile [BLOCK_N, BLOCK_K]; zm: fp32 [BLOCK_N], 2**23 + z (common.scale_and_zero)."""
    NB: tl.constexpr = BLOCK_N // 16
    z_lo, z_hi = split_rows(zm - 8388608.0, NB)
    if ASM:
        magic: tl.constexpr = 1024.0 if DTYPE == tl.float16 else 128.0
        nz_lo = (-(z_lo + magic)).to(DTYPE)
        nz_hi = (-(z_hi + magic)).to(DTYPE)
        args = [w, half_pair(nz_lo, nz_lo)[None, :, :, None, None], half_pair(nz_hi, nz_hi)[None, :, :, None, None]]
        if SCALED:
            asm: tl.constexpr = FRAG_SCALED_FP16 if DTYPE == tl.float16 else FRAG_SCALED_BF16
            s_lo, s_hi = split_rows(s, NB)
            s_lo = s_lo.to(DTYPE)
            s_hi = s_hi.to(DTYPE)
            c0, c1, c2, c3 = tl.inline_asm_elementwise(
                asm, "=r,=r,=r,=r,r,r,r,r,r",
                args + [half_pair(s_lo, s_lo)[None, :, :, None, None], half_pair(s_hi, s_hi)[None, :, :, None, None]],
                dtype=(tl.int32,) * 4, is_pure=True, pack=1)
        else:
            asm2: tl.constexpr = FRAG_PAIRS_FP16 if DTYPE == tl.float16 else FRAG_PAIRS_BF16
            c0, c1, c2, c3 = tl.inline_asm_elementwise(asm2, "=r,=r,=r,=r,r,r,r", args, dtype=(tl.int32,) * 4,
                                                       is_pure=True, pack=1)
        # The halves of each register; the compiler folds the split and the re-pairing away.
        tile = frag_tile(c0.to(tl.int16), c1.to(tl.int16), c2.to(tl.int16), c3.to(tl.int16),
                          (c0 >> 16).to(tl.int16), (c1 >> 16).to(tl.int16), (c2 >> 16).to(tl.int16),
                          (c3 >> 16).to(tl.int16), BLOCK_N, BLOCK_K)
        return tile.to(DTYPE, bitcast=True)
    zl = z_lo[None, :, :, None, None]
    zh = z_hi[None, :, :, None, None]
    tile = frag_tile(code_minus_zero(w, 0, zl), code_minus_zero(w, 1, zh), code_minus_zero(w, 2, zl),
                      code_minus_zero(w, 3, zh), code_minus_zero(w, 4, zl), code_minus_zero(w, 5, zh),
                      code_minus_zero(w, 6, zl), code_minus_zero(w, 7, zh), BLOCK_N, BLOCK_K)
    if SCALED:
        tile = tile * s[:, None]
    return tile.to(DTYPE)



def split_k_bounds(k: int, split_k: int, block_k: int) -> tuple[int, int]:
    """(K per split, a multiple of block_k; the number of splits that leaves)."""
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    return k_per_split, triton.cdiv(k, k_per_split)


def frag_block_k(w: W4A16Weights, config: KernelConfig) -> int:
    """The config's BLOCK_K, halved (down to 64) until a tile lies in one group."""
    config.require("BLOCK_K")
    block_k = config.BLOCK_K
    while w.group_size % block_k:
        block_k //= 2
    return max(block_k, FRAG_K)


# Products of more rows launch without PDL: at M = 128...1024 it measured 3-25% slower on half the
# shapes (gate_up at M=1024: 394 -> 446 us, H100), their multi-wave grids leaving no launch gap to
# hide; at M <= 64 it is 3-17% faster on every shape.
PDL_MAX_M = 64


def frag_launch_options(x: torch.Tensor) -> dict:
    return launch_options(x.device) if x.shape[0] <= PDL_MAX_M else {"PDL": False}
