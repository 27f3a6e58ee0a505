"""One-kernel forms of the small per-layer ops: RMSNorm (with the residual add), neox rotary
embedding, and SiLU-and-mul.

Eager torch spends 2-9 kernels on each of these; in a decode step of a 32-layer model that
is about a thousand tiny launches, which cost more than the weights' bytes once the linears
are 4-bit. Each kernel here reads its inputs once and writes its outputs once, computing in
fp32 and rounding where the torch forms (and the transformers reference) round:

    rms_norm:    s = round(x + residual)  (the new residual)
                 out = round(weight * round(s * rsqrt(mean(s**2) + eps)))
    rotary:      q, k rotated in place with cos/sin of each token's position
    silu_and_mul: out = round(silu(gate) * up)

One program handles one row (token); the row must fit one block (hidden sizes up to 32k).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmctl_kernels.launch import launch_options, pdl_wait


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, n_cols, eps,
    stride_x, stride_r, stride_o,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # Rounded to the model dtype before normalizing, as the torch form does.
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(residual_ptr.dtype.element_ty)
        tl.store(residual_ptr + row * stride_r + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    h = (h * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * h).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, D] (rows with unit stride) -> out [T, D]. With `residual` [T, D], it is
    overwritten with x + residual, the stream the next layer adds to."""
    assert x.dim() == 2 and x.stride(-1) == 1 and weight.shape == (x.shape[1],), (tuple(x.shape), tuple(weight.shape))
    num_rows, n_cols = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(-1) == 1 and residual.dtype == x.dtype
    block = triton.next_power_of_2(n_cols)
    if num_rows:
        _rms_norm_kernel[(num_rows,)](
            x, residual if residual is not None else x, weight, out, n_cols, eps,
            x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
            **launch_options(x.device),
        )
    return out


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, positions_ptr, cos_sin_ptr,
    stride_qt, stride_kt, stride_cp,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait(PDL)
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    HALF: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HALF
    # cos_sin row [2, HEAD_DIM] (fp32): both halves of cos (and sin) are the same frequencies.
    cos = tl.load(cos_sin_ptr + pos * stride_cp + d, mask=d_mask, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cp + HEAD_DIM + d, mask=d_mask, other=0.0)
    heads = tl.arange(0, BLOCK_H)
    for which in tl.static_range(2):
        if which == 0:
            base, num_heads = q_ptr + token * stride_qt, NUM_Q_HEADS
        else:
            base, num_heads = k_ptr + token * stride_kt, NUM_K_HEADS
        mask = (heads < num_heads)[:, None] & d_mask[None, :]
        ptr1 = base + heads[:, None] * HEAD_DIM + d[None, :]
        x1 = tl.load(ptr1, mask=mask, other=0.0)
        x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0)
        dtype = x1.dtype
        # The torch form rounds cos/sin to the activations' dtype first.
        c = cos.to(dtype).to(tl.float32)[None, :]
        s = sin.to(dtype).to(tl.float32)[None, :]
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        tl.store(ptr1, (a * c - b * s).to(dtype), mask=mask)
        tl.store(ptr1 + HALF, (b * c + a * s).to(dtype), mask=mask)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                     head_dim: int) -> None:
    """Rotate q [T, H*Dh] and k [T, Hkv*Dh] in place (neox halves) by positions [T];
    cos_sin_cache: [max_position, 2, head_dim] fp32."""
    num_tokens = positions.shape[0]
    assert q.dim() == 2 and k.dim() == 2 and q.shape[0] == k.shape[0] == num_tokens
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin_cache.is_contiguous()
    assert head_dim % 2 == 0 and q.shape[1] % head_dim == 0 and k.shape[1] % head_dim == 0
    num_q, num_k = q.shape[1] // head_dim, k.shape[1] // head_dim
    if num_tokens:
        _rotary_kernel[(num_tokens,)](
            q, k, positions, cos_sin_cache, q.stride(0), k.stride(0), cos_sin_cache.stride(0),
            NUM_Q_HEADS=num_q, NUM_K_HEADS=num_k, HEAD_DIM=head_dim,
            BLOCK_H=triton.next_power_of_2(max(num_q, num_k)), BLOCK_D=triton.next_power_of_2(head_dim // 2),
            num_warps=4, **launch_options(q.device),
        )


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    # silu rounded to the dtype first, then the product: the torch form's two roundings.
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2*I] (gate then up) -> [T, I]."""
    assert x.dim() == 2 and x.stride(-1) == 1 and x.shape[1] % 2 == 0
    num_rows, n_cols = x.shape[0], x.shape[1] // 2
    out = torch.empty(num_rows, n_cols, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(n_cols))
    if num_rows:
        _silu_and_mul_kernel[(num_rows, triton.cdiv(n_cols, block))](
            x, out, n_cols, x.stride(0), out.stride(0), BLOCK=block, num_warps=4, **launch_options(x.device),
        )
    return out
