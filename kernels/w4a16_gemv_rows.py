"""Split-K GEMV for a few activation rows at once (M = 2..16): each weight tile is loaded and
dequantized once and multiplied into BLOCK_M rows on the CUDA cores.

The one-row GEMV (`w4a16_gemv`) runs one program per row, so at M rows every weight is
dequantized M times; there the integer work per weight, not the bytes, sets the time. Here a
code costs one shift and one AND-OR however many rows use it, plus one FMA per row. Tiles must
lie inside one quantization group and g_idx must be in order (act-order goes through a gather
of x up front, as in the other paths).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.w4a16_gemv import BITS_OF_ONE, _code_as_fraction

GEMV_ROWS_CONFIGS = [
    dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_KW=bkw, SPLIT_K=sk, num_warps=nw, num_stages=1)
    for bm in (2, 4, 8, 16)
    for bn, bkw, nw in ((256, 8, 4), (512, 8, 4), (128, 16, 4), (256, 16, 8))
    for sk in (4, 8, 16)
]


@triton.jit
def _w4a16_gemv_rows_kernel(
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, bias_ptr, out_ptr,
    M, N, K, rows_per_split, one_bits,
    stride_xm, stride_om,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
):
    VALS: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_r = tl.arange(0, BLOCK_KW)
    row_start = pid_k * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, K // VALS)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_KW):
        rows = r0 + offs_r
        r_mask = rows < row_end
        w = tl.load(qweight_ptr + rows[:, None] * N + offs_n[None, :], mask=r_mask[:, None] & n_mask[None, :],
                    other=0, eviction_policy="evict_first")
        g = (r0 * VALS) // GROUP_SIZE
        s = tl.load(scales_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zw = tl.load(qzeros_ptr + g * (N // VALS) + offs_n // VALS, mask=n_mask, other=0)
        z = ((zw >> ((offs_n % VALS) * BITS)) & MASK).to(tl.float32) + (ZERO_OFFSET + (1 << BITS))
        part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        xs = tl.zeros([BLOCK_M], dtype=tl.float32)
        for j in tl.static_range(VALS):
            xv = tl.load(x_rows + (rows * VALS + j)[None, :], mask=m_mask[:, None] & r_mask[None, :],
                         other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_KW]
            f = _code_as_fraction(w, j, one_bits, BITS)  # [BLOCK_KW, BLOCK_N]
            part += tl.sum(xv[:, :, None] * f[None, :, :], axis=1)
            xs += tl.sum(xv, axis=1)
        # sum_k x (q - z) = 2**BITS * sum_k x (1 + q / 2**BITS) - (2**BITS + z) * sum_k x, per group
        acc += ((1 << BITS) * part - xs[:, None] * z[None, :]) * s[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask, sem="relaxed")


def gemv_rows_supported(w, config: dict) -> bool:
    """Tiles of BLOCK_KW word rows inside one group, groups in order."""
    vals = 32 // w.bits
    return w.g_idx is None and w.group_size % (config["BLOCK_KW"] * vals) == 0


def w4a16_gemv_rows(
    x: torch.Tensor,  # [M, K] fp16/bf16, unit stride along K
    w,  # W4A16Weights
    bias: torch.Tensor | None,  # [N] or None
    out: torch.Tensor,  # [M, N] x.dtype; written, never read (zeroed here when SPLIT_K > 1)
    config: dict,
) -> torch.Tensor:
    m, k = x.shape
    n = w.out_features
    vals = 32 // w.bits
    if not gemv_rows_supported(w, config):
        raise ValueError(f"gemv_rows needs tiles inside one group (group {w.group_size}, BLOCK_KW "
                         f"{config['BLOCK_KW']}) and groups in order")
    if w.perm is not None:
        x = x.index_select(1, w.perm)
    block_kw = config["BLOCK_KW"]
    k_rows = k // vals
    rows_per_split = triton.cdiv(triton.cdiv(k_rows, config["SPLIT_K"]), block_kw) * block_kw
    split_k = triton.cdiv(k_rows, rows_per_split)
    target = out
    if split_k > 1:
        target = out.zero_() if out.dtype == torch.float16 else torch.zeros(m, n, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(n, config["BLOCK_N"]), split_k, triton.cdiv(m, config["BLOCK_M"]))
    _w4a16_gemv_rows_kernel[grid](
        x, w.qweight, w.scales, w.qzeros, bias if bias is not None else w.scales, target,
        m, n, k, rows_per_split, BITS_OF_ONE,
        x.stride(0), target.stride(0),
        BITS=w.bits, GROUP_SIZE=w.group_size, ZERO_OFFSET=w.zero_offset, HAS_BIAS=bias is not None,
        SPLIT_K=split_k, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_KW=block_kw,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    if target is not out:
        out.copy_(target)
    return out
