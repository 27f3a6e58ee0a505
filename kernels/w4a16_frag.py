"""W4A16 over the fragment layout: 4-bit codes repacked once, at load time, into the order in
which the tensor cores take them.

Why. The tensor-core dot takes its left operand from registers (mma.sync everywhere, wgmma on
Hopper). With the product computed transposed (out^T = W^T x^T) the dequantized weight tile is
that left operand, and a small M is the cheap N side of the instruction. If every thread already
holds exactly the codes of its operand fragment, the tile goes from the load to the tensor cores
with no layout conversion; the checkpoint's layout needs one, through shared memory, per tile
(store, barrier, load), which is what bounds the generic GEMM (kernels/w4a16_gemm.py) at small M.
The same layout serves the GEMV and the dequantize kernel, so the weights are stored once.

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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmctl_kernels.launch import interpreting, launch_options, pdl_signal, pdl_wait
from llmctl_kernels.reference import unpack_qweight
from llmctl_kernels.w4a16_gemv import CODE_PAIRS, _scale_and_zero, half2_sum_ptx, half_pair, pairs_fma_ptx, split_word_ptx

FRAG_K = 64  # input features per word block
FRAG_N = 16  # output features per slab

# The tuner's candidates (kernels/configs/w4a16.json records the winners per GPU).
FRAG_GEMV_CONFIGS = [
    dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=nw, num_stages=1)
    for bn, bk, nw in ((128, 128, 4), (256, 64, 4), (256, 128, 4), (128, 256, 4), (512, 64, 8))
    for sk in (8, 16)
]
FRAG_GEMM_CONFIGS = [
    dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, SCALE_IN_A=sa, num_warps=nw, num_stages=st)
    for bm, bn, bk, nw, st, sk, sa in (
        # decode: exact q - z on the tensor cores, scaled after the dot; split-K fills the GPU
        (16, 64, 128, 4, 4, 4, 0), (16, 64, 128, 4, 4, 8, 0), (16, 128, 128, 4, 4, 2, 0), (16, 128, 128, 4, 4, 4, 0),
        (16, 128, 128, 4, 4, 8, 0), (16, 128, 128, 8, 4, 4, 0), (32, 128, 128, 4, 3, 2, 0), (32, 128, 128, 4, 3, 4, 0),
        (32, 128, 128, 4, 3, 8, 0),
        (64, 64, 128, 4, 3, 2, 0), (64, 64, 128, 4, 3, 4, 0), (64, 128, 128, 4, 3, 2, 0), (64, 128, 128, 8, 3, 2, 0),
        # prefill: scaled weights, the dot accumulates in place
        (64, 128, 64, 4, 3, 2, 1), (64, 128, 128, 4, 3, 4, 1), (128, 128, 64, 8, 3, 1, 1), (128, 128, 64, 8, 3, 2, 1),
        (128, 128, 64, 8, 3, 4, 1), (128, 128, 128, 8, 3, 1, 1),
        (256, 128, 64, 8, 3, 1, 1), (256, 128, 64, 8, 3, 2, 1), (256, 128, 64, 8, 4, 3, 1),
    )
]


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


# q - z of each code pair, exact: split_word_ptx gives (MAGIC + q, MAGIC + q'), one HFMA2 with
# -(MAGIC + z) leaves (q - z, q' - z). Pairs 0 and 2 belong to row lr of the slab, 1 and 3 to
# row lr + 8 (two zero points per word). The pairs leave as the 32-bit registers the dot takes.
_FRAG_PAIRS = """{
.reg .b32 s1, s2, s3, c0, c1, c2, c3, one;
mov.b32 one, ONE2;
""" + split_word_ptx("$4", "MAGIC2") + pairs_fma_ptx(["$0", "$1", "$2", "$3"], CODE_PAIRS, "one", ["$5", "$6"],
                                                      "TYPE") + "}"
# SCALED: then times the rows' scales, one rounding (the weight as a dequantize-then-multiply GEMM
# sees it), so the dot accumulates in place and its result is not waited for inside the step.
_FRAG_SCALED = _FRAG_PAIRS.replace("}", """mul.rn.TYPE $0, $0, $7;
mul.rn.TYPE $1, $1, $8;
mul.rn.TYPE $2, $2, $7;
mul.rn.TYPE $3, $3, $8;
}""")
_FP16 = dict(MAGIC2="0x64006400", ONE2="0x3C003C00", TYPE="f16x2")
_BF16 = dict(MAGIC2="0x43004300", ONE2="0x3F803F80", TYPE="bf16x2")


def _instantiate(template: str, words: dict) -> tl.constexpr:
    for key, value in words.items():
        template = template.replace(key, value)
    return tl.constexpr(template)


FRAG_PAIRS_FP16 = _instantiate(_FRAG_PAIRS, _FP16)
FRAG_PAIRS_BF16 = _instantiate(_FRAG_PAIRS, _BF16)
FRAG_SCALED_FP16 = _instantiate(_FRAG_SCALED, _FP16)
FRAG_SCALED_BF16 = _instantiate(_FRAG_SCALED, _BF16)

# GEMV, fp16 x, two words of a thread (same rows, K 16 apart): the pairs as (q - z) / 16 (one HFMA2
# with 1/16 and -(64 + z/16), exact) times the matching pairs of x, (x[k], x[k+1]) and
# (x[k+8], x[k+9]); per row, the four products of each half summed in fp16, the halves in fp32.
# Rows lr and lr + 8: two results.
_FRAG_DOT_FP16 = tl.constexpr("""{
.reg .b32 s1, s2, s3, c0, c1, c2, c3, d0, d1, d2, d3, k, lo, hi;
.reg .f16 a, b;
.reg .f32 fa, fb;
mov.b32 k, 0x2C002C00;
"""
    + split_word_ptx("$2", "0x64006400") + pairs_fma_ptx(["d0", "d1", "d2", "d3"], CODE_PAIRS, "k", ["$4", "$5"])
    + split_word_ptx("$3", "0x64006400") + pairs_fma_ptx(CODE_PAIRS, CODE_PAIRS, "k", ["$4", "$5"]) + """\
mul.rn.f16x2 lo, d0, $6;
fma.rn.f16x2 lo, d2, $7, lo;
fma.rn.f16x2 lo, c0, $8, lo;
fma.rn.f16x2 lo, c2, $9, lo;
mul.rn.f16x2 hi, d1, $6;
fma.rn.f16x2 hi, d3, $7, hi;
fma.rn.f16x2 hi, c1, $8, hi;
fma.rn.f16x2 hi, c3, $9, hi;
""" + half2_sum_ptx("$0", "lo", "a, b", "fa, fb") + half2_sum_ptx("$1", "hi", "a, b", "fa, fb") + "}")


@triton.jit
def _split_rows(v, NB: tl.constexpr):
    """A per-feature vector [16 NB] as its values at rows lr and lr + 8 of each slab: two [NB, 8]."""
    return tl.split(tl.permute(tl.reshape(v, [NB, 2, 8]), (0, 2, 1)))


@triton.jit
def _load_frag_words(qweight_ptr, k0, k_end, pid_n, N, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The words of W[k0:k0+BLOCK_K, pid_n*BLOCK_N:...] as [KB, NB, lr, lc, kbi] (zero where masked)."""
    NB: tl.constexpr = BLOCK_N // 16
    KB: tl.constexpr = BLOCK_K // 64
    nbs = pid_n * NB + tl.arange(0, NB)
    kbs = k0 // 64 + tl.arange(0, KB)
    mask = (kbs * 64 < k_end)[:, None, None] & (nbs < N // 16)[None, :, None]
    w = tl.load(qweight_ptr + kbs[:, None, None] * (N // 16 * 128) + nbs[None, :, None] * 128
                + tl.arange(0, 128)[None, None, :], mask=mask, other=0, eviction_policy="evict_first")
    return tl.reshape(w, [KB, NB, 8, 4, 4])


@triton.jit
def _code_minus_zero(w, i: tl.constexpr, z):
    """Nibble i of each word minus z, in fp32 (the portable form of the PTX above)."""
    return ((w >> (4 * i)) & 15).to(tl.float32) - z


@triton.jit
def _frag_tile(h0, h1, h2, h3, h4, h5, h6, h7, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Nibble i's values h_i [KB, NB, lr, lc, kbi] -> the tile W^T [BLOCK_N, BLOCK_K]. Each join
    appends a minor dim, so v is [kb, nb, lr, lc, kbi, h, jlo, jhi]; every permutation stays
    within a thread, and the result is the dot's operand layout."""
    v = tl.join(tl.join(tl.join(h0, h4), tl.join(h1, h5)), tl.join(tl.join(h2, h6), tl.join(h3, h7)))
    v = tl.permute(v, (1, 6, 2, 0, 4, 7, 3, 5))  # nb jlo lr | kb kbi jhi lc h
    return tl.reshape(v, [BLOCK_N, BLOCK_K])


@triton.jit
def _frag_weight_tile(w, zm, s, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr,
                      ASM: tl.constexpr, SCALED: tl.constexpr):
    """The exact q - z of words w [KB, NB, lr, lc, kbi] (times the scales s if SCALED) as the
    DTYPE tile [BLOCK_N, BLOCK_K]; zm: fp32 [BLOCK_N], 2**23 + z (w4a16_gemv._scale_and_zero)."""
    NB: tl.constexpr = BLOCK_N // 16
    z_lo, z_hi = _split_rows(zm - 8388608.0, NB)
    if ASM:
        magic: tl.constexpr = 1024.0 if DTYPE == tl.float16 else 128.0
        nz_lo = (-(z_lo + magic)).to(DTYPE)
        nz_hi = (-(z_hi + magic)).to(DTYPE)
        args = [w, half_pair(nz_lo, nz_lo)[None, :, :, None, None], half_pair(nz_hi, nz_hi)[None, :, :, None, None]]
        if SCALED:
            asm: tl.constexpr = FRAG_SCALED_FP16 if DTYPE == tl.float16 else FRAG_SCALED_BF16
            s_lo, s_hi = _split_rows(s, NB)
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
        tile = _frag_tile(c0.to(tl.int16), c1.to(tl.int16), c2.to(tl.int16), c3.to(tl.int16),
                          (c0 >> 16).to(tl.int16), (c1 >> 16).to(tl.int16), (c2 >> 16).to(tl.int16),
                          (c3 >> 16).to(tl.int16), BLOCK_N, BLOCK_K)
        return tile.to(DTYPE, bitcast=True)
    zl = z_lo[None, :, :, None, None]
    zh = z_hi[None, :, :, None, None]
    tile = _frag_tile(_code_minus_zero(w, 0, zl), _code_minus_zero(w, 1, zh), _code_minus_zero(w, 2, zl),
                      _code_minus_zero(w, 3, zh), _code_minus_zero(w, 4, zl), _code_minus_zero(w, 5, zh),
                      _code_minus_zero(w, 6, zl), _code_minus_zero(w, 7, zh), BLOCK_N, BLOCK_K)
    if SCALED:
        tile = tile * s[:, None]
    return tile.to(DTYPE)


@triton.jit
def _store_output(out, out_ptrs, mask, ATOMIC: tl.constexpr):
    """Store a program's fp32 output tile; with split-K the partial sums meet through atomic adds
    into a zeroed output. (A scratch buffer with per-tile arrival counters, the last split adding
    the partials, needs no zeroing launch but measured slower on the H200: docs/benchmarks.md.)"""
    if ATOMIC:
        tl.atomic_add(out_ptrs, out.to(out_ptrs.dtype.element_ty), mask=mask, sem="relaxed")
    else:
        tl.store(out_ptrs, out.to(out_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _frag_gemm_kernel(
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, bias_ptr, out_ptr,
    M, N, K, k_per_split, stride_xm, stride_om,
    GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_IN_A: tl.constexpr,
    ASM: tl.constexpr, PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    pdl_wait(PDL)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    # Every tile lies in one group (GROUP_SIZE % BLOCK_K == 0). Its scales and zeros are loaded a
    # step ahead, into registers: the pipeliner leaves the 16-bit scale load synchronous, and
    # loaded where it is used it would stall every step for a DRAM round trip.
    s_next, zm_next = _scale_and_zero(scales_ptr, qzeros_ptr, k_start // GROUP_SIZE, offs_n, n_mask, N, 4,
                                      ZERO_OFFSET)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_rows + ks[None, :], mask=m_mask[:, None] & (ks < k_end)[None, :], other=0.0)
        w = _load_frag_words(qweight_ptr, k0, k_end, pid_n, N, BLOCK_N, BLOCK_K)
        s = s_next
        zm = zm_next
        # (the last step reloads the last group rather than read past the scales)
        g_next = tl.minimum(k0 + BLOCK_K, K - 1) // GROUP_SIZE
        s_next, zm_next = _scale_and_zero(scales_ptr, qzeros_ptr, g_next, offs_n, n_mask, N, 4, ZERO_OFFSET)
        if ASM:
            wt = _frag_weight_tile(w, zm, s, BLOCK_N, BLOCK_K, a.dtype, True, SCALE_IN_A)
            xt = tl.trans(a)
        else:
            # the interpreter's bf16 arithmetic is broken: fp32 operands, upcast right after loading
            wt = _frag_weight_tile(w, zm, s, BLOCK_N, BLOCK_K, tl.float32, False, SCALE_IN_A)
            xt = tl.trans(a.to(tl.float32))  # (fp32 dots are exact in the interpreter)
        if SCALE_IN_A:
            # (large M) the dot accumulates in place and runs while the next tile is dequantized
            acc = tl.dot(wt, xt, acc)
        else:
            # (small M) exact q - z on the tensor cores, scaled per output feature after the dot
            acc += tl.dot(wt, xt) * s[:, None]
    # the next kernel launches while this one's programs finish (signalled at entry, its programs
    # would take SM slots beside ours and be placed unevenly)
    pdl_signal(PDL)
    acc = tl.trans(acc)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    _store_output(acc, out_ptrs, m_mask[:, None] & n_mask[None, :], ATOMIC)


@triton.jit
def _x_k(k0, jhi: tl.constexpr, KB: tl.constexpr):
    """k = k0 + 64 kb + 16 kbi + 8 jhi + 2 lc, the first row of the x pair that a word's code
    pairs 2 jhi and 2 jhi + 1 meet: [KB, 1, 1, lc, kbi]."""
    return (k0 + 64 * tl.arange(0, KB)[:, None, None, None, None] + 16 * tl.arange(0, 4)[None, None, None, None, :]
            + 8 * jhi + 2 * tl.arange(0, 4)[None, None, None, :, None])


@triton.jit
def _x_at(x_row, perm_ptr, k, k_end, HAS_PERM: tl.constexpr):
    """x at (prepared) rows k, through perm with act-order."""
    if HAS_PERM:
        src = tl.load(perm_ptr + k, mask=k < k_end, other=0)
    else:
        src = k
    return tl.load(x_row + src, mask=k < k_end, other=0.0)


@triton.jit
def _x_pairs(x_row, perm_ptr, k0, k_end, jhi: tl.constexpr, KB: tl.constexpr, HAS_PERM: tl.constexpr):
    """(x[k], x[k+1]) as half2 words [KB, 1, 1, lc, kbi] (k from `_x_k`): one 32-bit load per pair,
    or two gathered halves with act-order."""
    k = _x_k(k0, jhi, KB)
    if HAS_PERM:
        return half_pair(_x_at(x_row, perm_ptr, k, k_end, True), _x_at(x_row, perm_ptr, k + 1, k_end, True))
    return tl.load(x_row.to(tl.pointer_type(tl.int32)) + k // 2, mask=k < k_end, other=0)


@triton.jit
def _frag_gemv_kernel(
    x_ptr, perm_ptr, qweight_ptr, scales_ptr, qzeros_ptr, bias_ptr, out_ptr,
    N, K, k_per_split, stride_xm, stride_om,
    GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
    HAS_PERM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HALF2: tl.constexpr,
    PDL: tl.constexpr,
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
        w = _load_frag_words(qweight_ptr, k0, k_end, pid_n, N, BLOCK_N, BLOCK_K)
        s, zm = _scale_and_zero(scales_ptr, qzeros_ptr, k0 // GROUP_SIZE, offs_n, n_mask, N, 4, ZERO_OFFSET)
        s_lo, s_hi = _split_rows(s, NB)
        z_lo, z_hi = _split_rows(zm - 8388608.0, NB)
        if HALF2:
            nz_lo = (-(64.0 + z_lo * 0.0625)).to(tl.float16)
            nz_hi = (-(64.0 + z_hi * 0.0625)).to(tl.float16)
            # words and x pairs of kbi = 2i and 2i + 1 side by side: [KB, NB, lr, lc, 2]
            wa, wb = tl.split(tl.reshape(w, [KB, NB, 8, 4, 2, 2]))
            x0 = _x_pairs(x_row, perm_ptr, k0, k_end, 0, KB, HAS_PERM)
            x1 = _x_pairs(x_row, perm_ptr, k0, k_end, 1, KB, HAS_PERM)
            xa0, xb0 = tl.split(tl.reshape(x0, [KB, 1, 1, 4, 2, 2]))
            xa1, xb1 = tl.split(tl.reshape(x1, [KB, 1, 1, 4, 2, 2]))
            lo, hi = tl.inline_asm_elementwise(
                _FRAG_DOT_FP16, "=f,=f,r,r,r,r,r,r,r,r",
                [wa, wb, half_pair(nz_lo, nz_lo)[None, :, :, None, None],
                 half_pair(nz_hi, nz_hi)[None, :, :, None, None], xa0, xa1, xb0, xb1],
                dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
            acc_lo += lo * (16.0 * s_lo)[None, :, :, None, None]
            acc_hi += hi * (16.0 * s_hi)[None, :, :, None, None]
        else:
            k_0 = _x_k(k0, 0, KB)
            k_1 = _x_k(k0, 1, KB)
            x00 = _x_at(x_row, perm_ptr, k_0, k_end, HAS_PERM).to(tl.float32)
            x01 = _x_at(x_row, perm_ptr, k_0 + 1, k_end, HAS_PERM).to(tl.float32)
            x10 = _x_at(x_row, perm_ptr, k_1, k_end, HAS_PERM).to(tl.float32)
            x11 = _x_at(x_row, perm_ptr, k_1 + 1, k_end, HAS_PERM).to(tl.float32)
            zl = z_lo[None, :, :, None, None]
            zh = z_hi[None, :, :, None, None]
            # nibble i: pair j = i % 4 (jhi = j // 2, row jlo = j % 2), h = i // 4
            lo = (_code_minus_zero(w, 0, zl) * x00 + _code_minus_zero(w, 4, zl) * x01
                  + _code_minus_zero(w, 2, zl) * x10 + _code_minus_zero(w, 6, zl) * x11)
            hi = (_code_minus_zero(w, 1, zh) * x00 + _code_minus_zero(w, 5, zh) * x01
                  + _code_minus_zero(w, 3, zh) * x10 + _code_minus_zero(w, 7, zh) * x11)
            acc_lo += lo * s_lo[None, :, :, None, None]
            acc_hi += hi * s_hi[None, :, :, None, None]
    pdl_signal(PDL)  # as in the GEMM: the next kernel launches during this one's tail
    out_lo = tl.sum(tl.sum(tl.sum(acc_lo, axis=4), axis=3), axis=0)  # [NB, 8]
    out_hi = tl.sum(tl.sum(tl.sum(acc_hi, axis=4), axis=3), axis=0)
    out = tl.reshape(tl.permute(tl.join(out_lo, out_hi), (0, 2, 1)), [BLOCK_N])  # n = 16 nb + 8 jlo + lr
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        out += tl.where(pid_k == 0, bias, 0.0)
    _store_output(out, out_ptr + pid_m * stride_om + offs_n, n_mask, ATOMIC)


@triton.jit
def _frag_dequant_kernel(qweight_ptr, scales_ptr, qzeros_ptr, perm_ptr, out_ptr, N, K,
                         GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr, HAS_PERM: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """out[perm[k], n] = W[k, n] for one 64-row block of K (one group) and BLOCK_N features."""
    k0 = tl.program_id(0) * 64
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w = _load_frag_words(qweight_ptr, k0, K, pid_n, N, BLOCK_N, 64)
    s, zm = _scale_and_zero(scales_ptr, qzeros_ptr, k0 // GROUP_SIZE, offs_n, n_mask, N, 4, ZERO_OFFSET)
    tile = _frag_weight_tile(w, zm, s, BLOCK_N, 64, tl.float32, False, True)  # [BLOCK_N, 64]
    ks = k0 + tl.arange(0, 64)
    if HAS_PERM:
        rows = tl.load(perm_ptr + ks)
    else:
        rows = ks
    out_ptrs = out_ptr + rows.to(tl.int64)[None, :] * N + offs_n[:, None]
    tl.store(out_ptrs, tile.to(out_ptr.dtype.element_ty), mask=n_mask[:, None])


def _split(k: int, split_k: int, block_k: int) -> tuple[int, int]:
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    return k_per_split, triton.cdiv(k, k_per_split)


def _block_k(w, config: dict) -> int:
    """The config's BLOCK_K, halved (down to 64) until a tile lies in one group."""
    block_k = config["BLOCK_K"]
    while w.group_size % block_k:
        block_k //= 2
    return max(block_k, FRAG_K)


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


def _gather_and_zero(x: torch.Tensor | None, perm: torch.Tensor | None, zero: torch.Tensor | None,
                     m: int, k: int, n: int, launch: dict) -> torch.Tensor | None:
    """One launch of `_gather_and_zero_kernel`: x gathered through perm (returned; None without
    perm) and/or `zero` zeroed."""
    xg = None if perm is None else torch.empty(m, k, device=x.device, dtype=x.dtype)
    some = zero if zero is not None else xg  # stands in for the pointers this launch does not use
    width = max(k if perm is not None else 0, n if zero is not None else 0)
    block = 1024
    _gather_and_zero_kernel[(triton.cdiv(width, block), m)](
        some if x is None else x, some if perm is None else perm, some if xg is None else xg,
        some if zero is None else zero, k, n, 0 if x is None else x.stride(0), 0 if zero is None else zero.stride(0),
        GATHER=perm is not None, ZERO=zero is not None, BLOCK=block, num_warps=4, **launch)
    return xg


# Products of more rows launch without PDL: at M = 128...1024 it measured 3-25% slower on half the
# shapes (gate_up at M=1024: 394 -> 446 us, H100), their multi-wave grids leaving no launch gap to
# hide; at M <= 64 it is 3-17% faster on every shape.
PDL_MAX_M = 64


def _launch(x: torch.Tensor) -> dict:
    return launch_options(x.device) if x.shape[0] <= PDL_MAX_M else {"PDL": False}


# bf16 split-K sums in fp32 (bf16 atomics would round every partial to 8 bits of mantissa), in a
# buffer per device that is zero between launches: the kernel that converts the sums to bf16 also
# zeroes it, so no memset launch comes before the next product. Grown outside graph capture only;
# a buffer an earlier capture recorded stays alive.
_FP32_SUMS: dict[torch.device, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []


def _zeroed_sums(out: torch.Tensor) -> torch.Tensor:
    held = _FP32_SUMS.get(out.device)
    if held is None or held.numel() < out.numel():
        if out.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return torch.zeros(out.shape, device=out.device, dtype=torch.float32)  # this launch only
        if held is not None:
            _RETIRED.append(held)
        held = torch.zeros(out.numel(), device=out.device, dtype=torch.float32)
        _FP32_SUMS[out.device] = held
    return held[:out.numel()].view(out.shape)


def _target(out: torch.Tensor, split_k: int, launch: dict) -> torch.Tensor:
    """Where the kernel writes: the output itself, or with split-K the atomic adds' zeroed target
    (fp16: the output, zeroed here; bf16: fp32 sums, see `_finish`)."""
    if split_k == 1:
        return out
    if out.dtype == torch.float16:
        if launch["PDL"]:
            _gather_and_zero(None, None, out, out.shape[0], 0, out.shape[1], launch)
            return out
        return out.zero_()
    return _zeroed_sums(out)


def _finish(target: torch.Tensor, out: torch.Tensor, launch: dict) -> None:
    if target is out:
        return
    if target.data_ptr() == _FP32_SUMS.get(out.device, out).data_ptr():
        block = 1024
        _drain_kernel[(triton.cdiv(out.numel(), block),)](target, out, out.numel(), BLOCK=block, num_warps=4,
                                                          **launch)
    else:
        out.copy_(target)


def frag_gemm(x: torch.Tensor, w, bias: torch.Tensor | None, out: torch.Tensor, config: dict) -> torch.Tensor:
    """Tensor-core GEMM over the fragment layout; x [M, K] in checkpoint order."""
    m, k = x.shape
    n = w.out_features
    block_k = _block_k(w, config)
    k_per_split, split_k = _split(k, config["SPLIT_K"], block_k)
    grid = (triton.cdiv(n, config["BLOCK_N"]), split_k, triton.cdiv(m, config["BLOCK_M"]))
    launch = _launch(x)
    if w.perm is not None:
        # act-order: x gathered once up front, in the same launch that zeroes the split-K output
        # (on the H200 at M <= 64: 0.7-4.5 us over in-order weights, against 6-7.5 us with an
        # index_select and a memset; a gather inside the loop, 16-bit values that cannot be
        # copied asynchronously, was 1.5-15x slower)
        target = out if split_k == 1 or out.dtype == torch.float16 else _zeroed_sums(out)
        x = _gather_and_zero(x, w.perm, target if split_k > 1 and target is out else None, m, k, n, launch)
    else:
        target = _target(out, split_k, launch)
    _frag_gemm_kernel[grid](
        x, w.qweight, w.scales, w.qzeros, bias if bias is not None else w.scales, target,
        m, n, k, k_per_split, x.stride(0), target.stride(0),
        GROUP_SIZE=w.group_size, ZERO_OFFSET=w.zero_offset, HAS_BIAS=bias is not None, ATOMIC=split_k > 1,
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=block_k,
        SCALE_IN_A=bool(config.get("SCALE_IN_A", 0)), ASM=not interpreting(),
        num_warps=config["num_warps"], num_stages=config["num_stages"], **launch,
    )
    _finish(target, out, launch)
    return out


def frag_gemv(x: torch.Tensor, w, bias: torch.Tensor | None, out: torch.Tensor, config: dict) -> torch.Tensor:
    """CUDA-core GEMV over the fragment layout (fp16 x: half2 products; bf16: fp32); x in checkpoint
    order (act-order: gathered through w.perm in the kernel, or up front with GATHER_X=0)."""
    m, k = x.shape
    n = w.out_features
    block_k = _block_k(w, config)
    k_per_split, split_k = _split(k, config["SPLIT_K"], block_k)
    half2 = x.dtype == torch.float16 and not interpreting()
    launch = _launch(x)
    target = _target(out, split_k, launch)
    grid = (triton.cdiv(n, config["BLOCK_N"]), split_k, m)
    # act-order: x gathered through perm in the kernel (saves the launch of a gather up front, 3-15%
    # at M=1 on the H200), or up front with GATHER_X=0
    perm = w.perm if config.get("GATHER_X", 1) else None
    if w.perm is not None and perm is None:
        x = x.index_select(1, w.perm)
    _frag_gemv_kernel[grid](
        x, perm if perm is not None else w.qweight, w.qweight, w.scales, w.qzeros,
        bias if bias is not None else w.scales, target, n, k, k_per_split, x.stride(0), target.stride(0),
        GROUP_SIZE=w.group_size, ZERO_OFFSET=w.zero_offset, HAS_BIAS=bias is not None, ATOMIC=split_k > 1,
        HAS_PERM=perm is not None,
        BLOCK_N=config["BLOCK_N"], BLOCK_K=block_k, HALF2=half2,
        num_warps=config["num_warps"], num_stages=config["num_stages"], **launch,
    )
    _finish(target, out, launch)
    return out


def frag_dequantize(w, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight [K, N] in `dtype`, rows in checkpoint order."""
    k, n = w.in_features, w.out_features
    if out is None:
        out = torch.empty(k, n, device=w.qweight.device, dtype=dtype)
    block_n = 128
    _frag_dequant_kernel[(k // FRAG_K, triton.cdiv(n, block_n))](
        w.qweight, w.scales, w.qzeros, w.perm if w.perm is not None else w.qweight, out, n, k,
        GROUP_SIZE=w.group_size, ZERO_OFFSET=w.zero_offset, HAS_PERM=w.perm is not None, BLOCK_N=block_n,
        num_warps=4,
    )
    return out
