"""The split-K policy of every W4A16 path: where the partial sums of a product meet, and the one
scratch buffer they may need, sized once at engine start.

    fp16 output   the SPLIT_K programs add fp16 partials atomically into the output itself,
                  zeroed first (by `gather_and_zero` when launched with PDL, else a memset)
    bf16 output   bf16 atomics would round every partial to 8 bits of mantissa: the partials add
                  in fp32, into `SplitKScratch.sums` (zero between launches: the kernel that
                  converts them to bf16 zeroes them again, so no memset precedes the next
                  product), or, without a scratch object, into a zeroed temporary

Only products of at most SPLIT_K_MAX_M rows split K (the tables and the tuner keep to it), so the
scratch holds SPLIT_K_MAX_M x the widest output. The engine creates one `SplitKScratch` before it
measures its memory (GPTQLinearMethod.allocate_workspace), so the buffer is part of the profile
that sizes the KV cache; nothing here grows at run time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmctl_kernels.launch import pdl_wait

SPLIT_K_MAX_M = 256  # rows; larger products never split K


class SplitKScratch:
    """fp32 sums for bf16 split-K products of up to max_rows x max_cols outputs, zero between launches."""

    def __init__(self, device: torch.device, max_rows: int, max_cols: int) -> None:
        if max_rows < 1 or max_cols < 1:
            raise ValueError(f"SplitKScratch needs positive sizes, got {max_rows} x {max_cols}")
        self.max_rows = min(max_rows, SPLIT_K_MAX_M)
        self.max_cols = max_cols
        self.sums = torch.zeros(self.max_rows * max_cols, device=device, dtype=torch.float32)

    @property
    def num_bytes(self) -> int:
        return self.sums.numel() * self.sums.element_size()

    def zeroed(self, m: int, n: int) -> torch.Tensor:
        """The zero [m, n] fp32 view the partial sums of one product add into."""
        assert m <= self.max_rows and n <= self.max_cols, (
            f"split-K product [{m}, {n}] exceeds the scratch sized at start ({self.max_rows} x {self.max_cols})")
        return self.sums[:m * n].view(m, n)


@triton.jit
def _gather_and_zero_kernel(x_ptr, perm_ptr, xg_ptr, zero_ptr, K, N, stride_xm, stride_zm,
                            GATHER: tl.constexpr, ZERO: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """xg[m, k] = x[m, perm[k]] with GATHER and zero[m, :] = 0 with ZERO: act-order's gather and
    split-K's zeroed output in one launch instead of two (with PDL, the zeroing is a kernel
    rather than a memset, which could not overlap its neighbours). It signals by exiting: signalled
    at entry, the product after it was launched while the previous product's programs still held
    the SMs, and was placed unevenly (act-order down at M=16: 22 -> 34 us on the H100)."""
    pdl_wait(PDL)
    m = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if GATHER:
        k_mask = offs < K
        src = tl.load(perm_ptr + offs, mask=k_mask, other=0)
        tl.store(xg_ptr + m * K + offs, tl.load(x_ptr + m * stride_xm + src, mask=k_mask), mask=k_mask)
    if ZERO:
        n_mask = offs < N
        tl.store(zero_ptr + m * stride_zm + offs, tl.zeros([BLOCK], dtype=zero_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _drain_kernel(acc_ptr, out_ptr, numel, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out = acc in out's dtype, and acc = 0 again for the next launch."""
    pdl_wait(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    tl.store(out_ptr + offs, tl.load(acc_ptr + offs, mask=mask).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(acc_ptr + offs, tl.zeros([BLOCK], dtype=tl.float32), mask=mask)


def gather_and_zero(x: torch.Tensor | None, perm: torch.Tensor | None, zero: torch.Tensor | None,
                    m: int, k: int, n: int, launch: dict) -> torch.Tensor | None:
    """One launch of `_gather_and_zero_kernel`: x [m, k] gathered through perm (returned; None
    without perm) and/or `zero` [m, n] zeroed."""
    xg = None if perm is None else torch.empty(m, k, device=x.device, dtype=x.dtype)
    some = zero if zero is not None else xg  # stands in for the pointers this launch does not use
    width = max(k if perm is not None else 0, n if zero is not None else 0)
    block = 1024
    _gather_and_zero_kernel[(triton.cdiv(width, block), m)](
        some if x is None else x, some if perm is None else perm, some if xg is None else xg,
        some if zero is None else zero, k, n, 0 if x is None else x.stride(0), 0 if zero is None else zero.stride(0),
        GATHER=perm is not None, ZERO=zero is not None, BLOCK=block, num_warps=4, **launch)
    return xg


def split_k_target(out: torch.Tensor, split_k: int, launch: dict, scratch: SplitKScratch | None,
                   zero_out: bool = True) -> torch.Tensor:
    """Where a product's programs write (see the module docstring): `out` itself (zeroed here when
    split_k > 1 and zero_out), or fp32 sums for a bf16 split-K product. zero_out=False leaves the
    zeroing of an fp16 output to the caller (the act-order gather launch does it)."""
    m, n = out.shape
    if split_k == 1:
        return out
    assert m <= SPLIT_K_MAX_M, f"split-K at M={m}: the policy allows it up to M={SPLIT_K_MAX_M}"
    if out.dtype == torch.float16:
        if zero_out:
            if launch.get("PDL"):
                gather_and_zero(None, None, out, m, 0, n, launch)
            else:
                out.zero_()
        return out
    if scratch is None:
        return torch.zeros(m, n, device=out.device, dtype=torch.float32)  # this launch only
    return scratch.zeroed(m, n)


def finish_split_k(target: torch.Tensor, out: torch.Tensor, launch: dict, scratch: SplitKScratch | None) -> None:
    """Bring the sums of `split_k_target` into `out` (and zero the scratch again)."""
    if target is out:
        return
    if scratch is not None and target.data_ptr() == scratch.sums.data_ptr():
        block = 1024
        _drain_kernel[(triton.cdiv(out.numel(), block),)](target, out, out.numel(), BLOCK=block, num_warps=4,
                                                          **launch)
    else:
        out.copy_(target)
