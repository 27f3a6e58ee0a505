"""Dequantize GPTQ weights to a dense [K, N] matrix on the GPU, for the cuBLAS path at large M.

When M is large the matmul is compute-bound and cuBLAS beats a fused Triton GEMM by more than
the cost of writing the fp16 weight once. Rows come out in checkpoint order (act-order undone),
so the product needs no gather of x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmctl_kernels.w4a16.common import BITS_OF_2_23, scale_and_zero
from llmctl_kernels.w4a16.frag_tiles import frag_weight_tile, load_frag_words
from llmctl_kernels.w4a16.gptq_tiles import dequant_tile
from llmctl_kernels.w4a16.layout import FRAG_K, W4A16Weights

DEQUANT_CONFIG = dict(BLOCK_K=64, BLOCK_N=128, num_warps=4)


@triton.jit
def _w4a16_dequant_kernel(
    # pointers
    qweight_ptr, scales_ptr, qzeros_ptr, perm_ptr, g_idx_ptr, out_ptr,
    # sizes
    N, K, big_bits,
    # meta
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_G_IDX: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    k0 = tl.program_id(0) * BLOCK_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = k0 + tl.arange(0, BLOCK_K)
    k_mask = ks < K
    n_mask = offs_n < N
    w = dequant_tile(qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, k0, K, offs_n, n_mask, N, big_bits,
                      BITS, GROUP_SIZE, ZERO_OFFSET, HAS_G_IDX, BLOCK_K, True)
    if HAS_PERM:
        rows = tl.load(perm_ptr + ks, mask=k_mask, other=0)
    else:
        rows = ks
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(out_ptrs, w.to(out_ptr.dtype.element_ty), mask=k_mask[:, None] & n_mask[None, :])


@triton.jit
def _frag_dequant_kernel(qweight_ptr, scales_ptr, qzeros_ptr, perm_ptr, out_ptr, N, K,
                         GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr, HAS_PERM: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """out[perm[k], n] = W[k, n] for one 64-row block of K (one group) and BLOCK_N features."""
    k0 = tl.program_id(0) * 64
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w = load_frag_words(qweight_ptr, k0, K, pid_n, N, BLOCK_N, 64, 0)
    s, zm = scale_and_zero(scales_ptr, qzeros_ptr, k0 // GROUP_SIZE, offs_n, n_mask, N, 4, ZERO_OFFSET)
    tile = frag_weight_tile(w, zm, s, BLOCK_N, 64, tl.float32, False, True)  # [BLOCK_N, 64]
    ks = k0 + tl.arange(0, 64)
    if HAS_PERM:
        rows = tl.load(perm_ptr + ks)
    else:
        rows = ks
    out_ptrs = out_ptr + rows.to(tl.int64)[None, :] * N + offs_n[:, None]
    tl.store(out_ptrs, tile.to(out_ptr.dtype.element_ty), mask=n_mask[:, None])


def w4a16_dequantize(w: W4A16Weights, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight [K, N] in `dtype`, rows in checkpoint order (either layout)."""
    k, n = w.in_features, w.out_features
    if out is None:
        out = torch.empty(k, n, device=w.qweight.device, dtype=dtype)
    assert out.shape == (k, n) and out.dtype == dtype and out.is_contiguous(), (
        f"out must be a contiguous [{k}, {n}] {dtype}")
    if w.layout == "frag":
        block_n = 128
        _frag_dequant_kernel[(k // FRAG_K, triton.cdiv(n, block_n))](
            w.qweight, w.scales, w.qzeros, w.perm if w.perm is not None else w.qweight, out, n, k,
            GROUP_SIZE=w.group_size, ZERO_OFFSET=w.zero_offset, HAS_PERM=w.perm is not None, BLOCK_N=block_n,
            num_warps=4,
        )
        return out
    cfg = DEQUANT_CONFIG
    grid = (triton.cdiv(k, cfg["BLOCK_K"]), triton.cdiv(n, cfg["BLOCK_N"]))
    dummy = w.qweight
    _w4a16_dequant_kernel[grid](
        w.qweight, w.scales, w.qzeros,
        w.perm if w.perm is not None else dummy, w.g_idx if w.g_idx is not None else dummy, out,
        n, k, BITS_OF_2_23,
        BITS=w.bits, GROUP_SIZE=w.group_size, ZERO_OFFSET=w.zero_offset,
        HAS_PERM=w.perm is not None, HAS_G_IDX=w.g_idx is not None,
        BLOCK_K=cfg["BLOCK_K"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
    )
    return out


def w4a16_dequant_matmul(
    x: torch.Tensor,  # [M, K] fp16/bf16
    w: W4A16Weights,
    bias: torch.Tensor | None,  # [N] or None
    out: torch.Tensor,  # [M, N] x.dtype
) -> torch.Tensor:
    """Dequantize once, then let cuBLAS do the product."""
    dense = w4a16_dequantize(w, x.dtype)
    if bias is not None:
        return torch.addmm(bias.to(x.dtype), x, dense, out=out)
    return torch.mm(x, dense, out=out)
