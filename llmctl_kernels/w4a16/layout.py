"""The weights the W4A16 kernels read (`W4A16Weights`), prepared once at load time from a GPTQ
linear's checkpoint tensors (`prepare_w4a16_weights`), and the fragment layout's repacking.

Two layouts. 4-bit weights whose shapes allow it (K and the group size multiples of 64, N of 16)
are repacked into the fragment layout ("frag"): the order in which the tensor cores take the
codes, so that a dequantized tile needs no shared-memory round trip; every path reads it. Other
weights (2 and 8 bits, odd shapes) keep the checkpoint's own tensors ("gptq"), unchanged when
g_idx is in order.

Why the fragment layout. The tensor-core dot takes its left operand from registers (mma.sync
everywhere, wgmma on Hopper). With the product computed transposed (out^T = W^T x^T) the
dequantized weight tile is that left operand, and a small M is the cheap N side of the
instruction. If every thread already holds exactly the codes of its operand fragment, the tile
goes from the load to the tensor cores with no layout conversion; the checkpoint's layout needs
one, through shared memory, per tile (store, barrier, load).

Layout (`qweight` of `W4A16Weights` with layout "frag"): int32 [K/64, N/16, 128]. Word
(kb, nb, 4 * lane + kbi) holds the eight codes that lane `lane` = 4 lr + lc of a warp holds in
the 16 x 16 operand fragment for output features 16 nb ... and input features 64 kb + 16 kbi ...:

    nibble j (j = 2 jhi + jlo)  ->  W[k,     n]       n = 16 nb + 8 jlo + lr
    nibble j + 4                ->  W[k + 1, n]       k = 64 kb + 16 kbi + 8 jhi + 2 lc

so `split_word_ptx` turns a word into four code pairs (W[k, n], W[k + 1, n]), each one 32-bit
operand register, and a 64-wide K block of a 16-row slab is 512 contiguous bytes: one 16-byte
vector per lane. Scales and zero points stay in the checkpoint's layout. Eligible weights: 4-bit,
K % 64 == 0, N % 16 == 0, groups of a multiple of 64 rows after act-order sorting
(`frag_eligible`); others keep the checkpoint layout and its kernels.

With act-order, K is permuted once at load time, as vLLM does: rows of `qweight` are sorted by
group so that every group is a contiguous run of `group_size` rows again, and `perm` (int32 [K])
records where each row came from. The GEMVs read x[:, perm[k]] in the kernel (or gather it up
front, config GATHER_X=0); the GEMMs gather x once before their launch; the dequant path writes
rows back to checkpoint order, so x needs no gather there.

    checkpoint  k:  0  1  2  3  4  5  ...      g_idx: 1 0 1 0 ...
    prepared    k': 1  3  ...  0  2  ...       perm:  [1, 3, ..., 0, 2, ...]   groups: 0 0 ... 1 1 ...

Only a g_idx whose sorted form is not runs of one size (never written by GPTQ) keeps `g_idx` and
takes the slower per-k gather (checkpoint layout only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmctl_kernels.reference import pack_qweight, unpack_qweight

LAYOUTS = ("frag", "gptq")
TRITON_BITS = (2, 4, 8)
FRAG_K = 64  # input features per word block
FRAG_N = 16  # output features per slab


@dataclass(frozen=True)
class W4A16Weights:
    """GPTQ weights in the layout the kernels read (see the module docstring)."""

    qweight: torch.Tensor  # gptq: int32 [K*bits/32, N], rows in group order; frag: int32 [K/64, N/16, 128]
    qzeros: torch.Tensor  # int32 [G, N*bits/32]
    scales: torch.Tensor  # fp16/bf16 [G, N]
    perm: torch.Tensor | None  # int32 [K]: source column of x for each prepared row
    g_idx: torch.Tensor | None  # int32 [K]: only for irregular groups, else None
    bits: int
    group_size: int  # rows per group after preparation (K when the checkpoint has one group)
    zero_offset: int  # 1 for checkpoint format gptq (v1), 0 for gptq_v2
    in_features: int
    out_features: int
    layout: str = "gptq"  # "frag" or "gptq" (the module docstring)


def uniform_group_size(sorted_g_idx: torch.Tensor, num_groups: int, vals: int) -> int | None:
    """The run length if sorted g_idx is arange(K) // size (last run may be short), else None."""
    k = sorted_g_idx.numel()
    size = int((sorted_g_idx == 0).sum())
    if size == 0 or size % vals or -(-k // size) != num_groups:
        return None
    expect = torch.arange(k, device=sorted_g_idx.device) // size
    return size if torch.equal(sorted_g_idx.to(torch.long), expect) else None


def prepare_w4a16_weights(
    qweight: torch.Tensor,  # int32 [K*bits/32, N]
    qzeros: torch.Tensor,  # int32 [G, N*bits/32]
    scales: torch.Tensor,  # fp16/bf16 [G, N]
    g_idx: torch.Tensor | None,  # int [K]; None means groups in order (size K/G)
    bits: int = 4,
    zero_offset: int = 1,
    layout: str | None = None,  # None: "frag" where eligible, else "gptq"
) -> W4A16Weights:
    """Check a GPTQ linear's tensors and put them in kernel order (once, at load time)."""
    if bits not in TRITON_BITS:
        raise ValueError(f"bits={bits}: the Triton kernels support {TRITON_BITS}; use kernels.reference for others")
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dtype != torch.int32 or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    if scales.dtype not in (torch.float16, torch.bfloat16) or scales.dim() != 2:
        raise ValueError(f"scales must be 2-D fp16/bf16, got {scales.dtype} {tuple(scales.shape)}")
    vals = 32 // bits
    k, n = qweight.shape[0] * vals, qweight.shape[1]
    num_groups = scales.shape[0]
    if scales.shape[1] != n or qzeros.shape != (num_groups, n // vals) or n % vals:
        raise ValueError(f"scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} "
                         f"do not fit qweight [{k // vals}, {n}]")
    if g_idx is None:
        g_idx = torch.arange(k, device=qweight.device) // -(-k // num_groups)
    if g_idx.shape != (k,):
        raise ValueError(f"g_idx must have shape [{k}], got {tuple(g_idx.shape)}")
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= num_groups:
        raise ValueError(f"g_idx values must lie in [0, {num_groups})")
    perm = None
    sorted_g, order = torch.sort(g_idx.to(torch.long), stable=True)
    group_size = uniform_group_size(sorted_g, num_groups, vals)
    kept_g_idx = None
    if group_size is None:
        kept_g_idx = g_idx.to(torch.int32).contiguous()
        group_size = k
    elif not torch.equal(order, torch.arange(k, device=order.device)):
        perm = order.to(torch.int32).contiguous()
        qweight = pack_qweight(unpack_qweight(qweight, bits)[order], bits)
    eligible = frag_eligible(bits, k, n, group_size, kept_g_idx is not None)
    if layout is None:
        layout = "frag" if eligible else "gptq"
    elif layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    elif layout == "frag" and not eligible:
        raise ValueError(f"the frag layout needs 4-bit codes, K and the group size multiples of {FRAG_K} and N of "
                         f"{FRAG_N}; got bits={bits}, K={k}, N={n}, group size {group_size}")
    if layout == "frag":
        qweight = repack_frag(qweight)
    return W4A16Weights(
        qweight=qweight.contiguous(), qzeros=qzeros.contiguous(), scales=scales.contiguous(), perm=perm,
        g_idx=kept_g_idx, bits=bits, group_size=group_size, zero_offset=zero_offset, in_features=k, out_features=n,
        layout=layout,
    )


def frag_eligible(bits: int, k: int, n: int, group_size: int, irregular_groups: bool) -> bool:
    return bits == 4 and k % FRAG_K == 0 and n % FRAG_N == 0 and group_size % FRAG_K == 0 and not irregular_groups


def _frag_view(codes: torch.Tensor) -> torch.Tensor:
    """codes [K, N] -> [K/64, N/16, lr, lc, kbi, jhi, jlo, h], the order of the words' nibbles."""
    k, n = codes.shape
    t = codes.reshape(k // 64, 4, 2, 4, 2, n // 16, 2, 8)  # kb kbi jhi lc h | nb jlo lr
    return t.permute(0, 5, 7, 3, 1, 2, 6, 4)


def repack_frag(qweight: torch.Tensor) -> torch.Tensor:
    """Checkpoint-packed 4-bit qweight [K/8, N] -> the fragment layout int32 [K/64, N/16, 128]."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    out = torch.empty(k // 64, n // 16, 128, dtype=torch.int32, device=qweight.device)
    step = max(1, (1 << 24) // max(n * 64, 1))  # K blocks per chunk: bounded temporary memory
    for b0 in range(0, k // 64, step):
        b1 = min(k // 64, b0 + step)
        t = _frag_view(unpack_qweight(qweight[b0 * 8:b1 * 8], 4))
        words = torch.zeros(t.shape[:5], dtype=torch.int32, device=qweight.device)
        for jhi in range(2):
            for jlo in range(2):
                for h in range(2):
                    words |= t[..., jhi, jlo, h].to(torch.int32) << (4 * (2 * jhi + jlo + 4 * h))
        out[b0:b1] = words.reshape(b1 - b0, n // 16, 128)
    return out


def unpack_frag(qf: torch.Tensor) -> torch.Tensor:
    """The fragment layout [K/64, N/16, 128] -> codes [K, N] (int32), the inverse of `repack_frag`."""
    kb, nb = qf.shape[0], qf.shape[1]
    words = qf.reshape(kb, nb, 8, 4, 4)  # kb nb lr lc kbi
    codes = torch.empty(kb, nb, 8, 4, 4, 2, 2, 2, dtype=torch.int32, device=qf.device)
    for jhi in range(2):
        for jlo in range(2):
            for h in range(2):
                codes[..., jhi, jlo, h] = (words >> (4 * (2 * jhi + jlo + 4 * h))) & 15
    # [kb, nb, lr, lc, kbi, jhi, jlo, h] -> [kb, kbi, jhi, lc, h, nb, jlo, lr]
    return codes.permute(0, 4, 5, 3, 7, 1, 6, 2).reshape(kb * 64, nb * 16)
