"""GPTQ pack/unpack and the W4A16 Triton kernels against the fp32 reference.

The Triton kernels run under TRITON_INTERPRET=1 on the CPU at small shapes; the GPU tests
(`-m gpu`) run the same checks at real shapes.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported: the kernels then run in the CPU interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# bf16 output alone rounds away up to 2**-9 of each element. The interpreter converts fp32 to bf16
# by truncation (up to 2**-7 of each element), so it gets twice the room.
BF16_TOL = 4e-3 if DEVICE.type == "cuda" else 8e-3

from llmctl_kernels.reference import (  # noqa: E402 (after TRITON_INTERPRET is set)
    dequantize_gptq,
    pack_qweight,
    pack_qzeros,
    unpack_qweight,
    unpack_qzeros,
    w4a16_matmul_reference,
)


def _autogptq_pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's own loop (qlinear pack), written independently: values [R, C] packed along R."""
    v = values.to(torch.int64).numpy().astype("uint64")
    rows, cols = v.shape
    out = []
    i = 0
    if bits in (2, 4, 8):
        while i < rows:
            word = 0
            for j in range(32 // bits):
                word |= v[i + j] << (bits * j)
            out.append(word & 0xFFFFFFFF)
            i += 32 // bits
    else:  # 3 bits: 10 values, then one value split over two words, twice, then 10 more
        while i < rows:
            w0 = sum(v[i + j] << (3 * j) for j in range(10)) | (v[i + 10] << 30)
            w1 = ((v[i + 10] >> 2) & 1) | sum(v[i + 11 + j] << (3 * j + 1) for j in range(10)) | (v[i + 21] << 31)
            w2 = ((v[i + 21] >> 1) & 3) | sum(v[i + 22 + j] << (3 * j + 2) for j in range(10))
            out += [w0 & 0xFFFFFFFF, w1 & 0xFFFFFFFF, w2 & 0xFFFFFFFF]
            i += 32
    import numpy as np

    return torch.from_numpy(np.stack(out).astype("uint32").view("int32"))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_autogptq_and_round_trips(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    per = 32 if bits == 3 else 32 // bits
    k, n = 3 * per, 3 * per  # odd multiples of the pack size along both packed dims
    q = torch.randint(0, 2**bits, (k, n), generator=gen, dtype=torch.int32)
    packed = pack_qweight(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (k * bits // 32, n)
    assert torch.equal(packed, _autogptq_pack_cols(q, bits))
    assert torch.equal(unpack_qweight(packed, bits), q)

    z = torch.randint(0, 2**bits, (5, n), generator=gen, dtype=torch.int32)
    qz = pack_qzeros(z, bits)
    assert qz.shape == (5, n * bits // 32)
    assert torch.equal(qz, _autogptq_pack_cols(z.t(), bits).t())
    assert torch.equal(unpack_qzeros(qz, bits), z)


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_qweight(torch.zeros(12, 4, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="codes must lie"):
        pack_qweight(torch.full((8, 4), 16, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="bits"):
        pack_qweight(torch.zeros(8, 4, dtype=torch.int32), 5)


@pytest.mark.parametrize("zero_offset", [0, 1])
def test_dequantize_and_matmul_reference(zero_offset: int) -> None:
    gen = torch.Generator().manual_seed(7 + zero_offset)
    k, n, group = 64, 24, 16
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    z = torch.randint(0, 15, (k // group, n), generator=gen, dtype=torch.int32)
    s = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.001).half()
    g_idx = torch.randperm(k, generator=gen) // group  # act-order: groups scattered over K
    w = dequantize_gptq(pack_qweight(q, 4), pack_qzeros(z, 4), s, g_idx.int(), 4, zero_offset)
    expect = s.float()[g_idx] * (q.float() - z.float()[g_idx] - zero_offset)
    assert w.dtype == torch.float16
    torch.testing.assert_close(w, expect.half(), rtol=0, atol=0)
    x = torch.randn(3, k, generator=gen).half()
    bias = torch.randn(n, generator=gen).half()
    out = w4a16_matmul_reference(x, pack_qweight(q, 4), pack_qzeros(z, 4), s, g_idx, bias, 4, zero_offset)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), x.float() @ expect + bias.float(), rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- Triton kernels

from llmctl_kernels.w4a16 import prepare_w4a16_weights, w4a16_matmul  # noqa: E402

GEMV_SMALL = dict(BLOCK_N=16, BLOCK_KW=4, num_warps=1, num_stages=1)
GEMM_SMALL = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, num_warps=1, num_stages=1)


def _random_gptq(k: int, n: int, group: int, act_order: bool, gen: torch.Generator, bits: int = 4):
    """Fresh random GPTQ tensors; group=-1 means one group over all of K."""
    gs = k if group == -1 else group
    num_groups = -(-k // gs)
    q = torch.randint(0, 2**bits, (k, n), generator=gen, dtype=torch.int32)
    z = torch.randint(0, 2**bits - 1, (num_groups, n), generator=gen, dtype=torch.int32)
    s = (torch.rand(num_groups, n, generator=gen) * 0.02 + 0.002).half()
    order = torch.randperm(k, generator=gen) if act_order else torch.arange(k)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // gs).int()  # GPTQ's act-order: group by quantization order
    return pack_qweight(q, bits), pack_qzeros(z, bits), s, g_idx


def _check(m, k, n, group, act_order, path, config, *, bias=True, zero_offset=1, seed=0, dtype=torch.float16,
           layout="gptq"):
    gen = torch.Generator().manual_seed(seed)
    qweight, qzeros, scales, g_idx = _random_gptq(k, n, group, act_order, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    ref = w4a16_matmul_reference(x.float(), qweight, qzeros, scales, g_idx, None if b is None else b.float(),
                                 4, zero_offset)
    weights = prepare_w4a16_weights(qweight.to(DEVICE), qzeros.to(DEVICE), scales.to(DEVICE), g_idx.to(DEVICE),
                                    4, zero_offset, layout=layout)
    eligible = n % 16 == 0 and k % 64 == 0 and (group == -1 or group % 64 == 0)
    assert weights.layout == (layout or ("frag" if eligible else "gptq"))
    assert (weights.perm is not None) == (act_order and group != -1)  # one group: nothing to permute
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    got = w4a16_matmul(x.to(DEVICE), weights, None if b is None else b.to(DEVICE), path=path, config=config,
                       out=out).cpu()
    assert got.shape == (m, n) and got.dtype == dtype
    assert not torch.isnan(got).any(), "unwritten output elements"
    rel = (got.float() - ref).norm() / ref.norm()
    # fp16 output rounds away up to 2**-12 of each element; bf16: BF16_TOL.
    tol = 1e-3 if dtype == torch.float16 else BF16_TOL
    assert rel <= tol, f"relative error {rel:.2e} (seed {seed})"


# (M, K, N, group, act_order, path, config): every path, every group size, K not a tile multiple.
CASES = [
    (1, 320, 72, 128, False, "gemv", dict(GEMV_SMALL, SPLIT_K=1)),
    (1, 320, 72, 128, True, "gemv", dict(GEMV_SMALL, SPLIT_K=3, PREFETCH=1)),
    (1, 320, 72, 128, True, "gemv", dict(GEMV_SMALL, SPLIT_K=3, GATHER_X=1)),  # in-kernel gather
    (1, 256, 64, 64, False, "gemv", dict(GEMV_SMALL, SPLIT_K=2, PREFETCH=1)),  # EVEN: no masks
    (2, 256, 64, 64, True, "gemv", dict(GEMV_SMALL, BLOCK_KW=16, SPLIT_K=1)),  # EVEN, one group per tile
    (3, 96, 24, 32, True, "gemv", dict(GEMV_SMALL, SPLIT_K=2)),
    (1, 200, 8, -1, False, "gemv", dict(GEMV_SMALL, SPLIT_K=2)),
    (1, 320, 72, 128, False, "gemv", dict(GEMV_SMALL, SPLIT_K=1, PREFETCH=1)),
    (2, 256, 64, 64, True, "gemv", dict(GEMV_SMALL, BLOCK_KW=16, SPLIT_K=2)),  # a tile spans two groups
    # HALF2=1: each word's products in fp16 pairs (inline PTX on the GPU), fp32 between words
    (1, 320, 72, 128, False, "gemv", dict(GEMV_SMALL, SPLIT_K=2, HALF2=1)),
    (2, 256, 64, 64, True, "gemv", dict(GEMV_SMALL, BLOCK_KW=8, SPLIT_K=1, HALF2=1)),
    (17, 192, 24, 64, False, "gemm", dict(GEMM_SMALL, SPLIT_K=1, SWAP_AB=0, PACKED_LOAD=0)),
    (17, 192, 24, 64, True, "gemm", dict(GEMM_SMALL, SPLIT_K=2, SWAP_AB=1, PREFETCH=1)),
    (17, 192, 24, 64, True, "gemm", dict(GEMM_SMALL, SPLIT_K=1, SWAP_AB=0, GATHER_X=1)),  # in-kernel gather
    # INT_DOT=1: exact codes on the tensor cores, zero and scale applied per column after the dot
    (17, 192, 24, 64, False, "gemm", dict(GEMM_SMALL, SPLIT_K=2, SWAP_AB=0, INT_DOT=1)),
    (17, 192, 24, 64, True, "gemm", dict(GEMM_SMALL, SPLIT_K=1, SWAP_AB=1, INT_DOT=1)),
    (3, 200, 24, -1, False, "gemm", dict(GEMM_SMALL, SPLIT_K=1, SWAP_AB=0, INT_DOT=1)),  # one group
    # PAIRS=1: each word's eight codes joined in-thread (two per LOP3 of inline PTX on the GPU)
    (17, 192, 24, 64, False, "gemm", dict(GEMM_SMALL, SPLIT_K=2, SWAP_AB=1, INT_DOT=1, PAIRS=1)),
    (5, 320, 72, 128, True, "gemm", dict(GEMM_SMALL, SPLIT_K=3, SWAP_AB=0, INT_DOT=1, PAIRS=1)),
    (3, 320, 72, 128, True, "gemm", dict(GEMM_SMALL, BLOCK_K=64, SPLIT_K=3, SWAP_AB=0)),
    (1, 96, 8, 32, False, "gemm", dict(GEMM_SMALL, BLOCK_K=64, SPLIT_K=1, SWAP_AB=1)),  # groups inside a tile
    (3, 96, 8, 32, True, "gemm", dict(GEMM_SMALL, BLOCK_K=64, SPLIT_K=2, SWAP_AB=0, PACKED_LOAD=0)),
    (3, 200, 24, -1, True, "gemm", dict(GEMM_SMALL, SPLIT_K=1, SWAP_AB=0, PREFETCH=1)),
    (17, 320, 72, 128, True, "dequant", {}),
    (3, 96, 24, 32, False, "dequant", {}),
]


def _case_seed(*case) -> int:
    """A seed per case, the same in every run. (Python's hash of a string changes from process
    to process: each run drew new inputs, and 1 seed in 1000 of the 8-output split-K GEMV case
    rounds its two fp16 partial sums, added atomically, to 1.02e-3 of the norm.)"""
    return zlib.crc32(repr(case).encode()) % 1000


@pytest.mark.parametrize("m,k,n,group,act_order,path,config", CASES)
def test_w4a16_paths_match_reference(m, k, n, group, act_order, path, config) -> None:
    _check(m, k, n, group, act_order, path, config, seed=_case_seed(m, k, n, group, path))


def test_irregular_groups_take_the_gather_path() -> None:
    """A g_idx whose sorted runs differ in length keeps g_idx and gathers per k on every path."""
    gen = torch.Generator().manual_seed(_case_seed("test_irregular_groups_take_the_gather_path"))
    k, n = 96, 24
    qweight, qzeros, scales, _ = _random_gptq(k, n, 32, False, gen)
    g_idx = torch.randint(0, 3, (k,), generator=gen, dtype=torch.int32)
    g_idx[:3] = torch.tensor([0, 1, 2], dtype=torch.int32)
    weights = prepare_w4a16_weights(qweight.to(DEVICE), qzeros.to(DEVICE), scales.to(DEVICE), g_idx.to(DEVICE))
    assert weights.g_idx is not None and weights.perm is None
    x = torch.randn(3, k, generator=gen).half()
    ref = w4a16_matmul_reference(x.float(), qweight, qzeros, scales, g_idx)
    for path, config in (("gemv", dict(GEMV_SMALL, SPLIT_K=2)), ("gemm", dict(GEMM_SMALL, SPLIT_K=1, SWAP_AB=0)),
                         ("dequant", {})):
        out = torch.full((3, n), float("nan"), dtype=torch.float16, device=DEVICE)
        got = w4a16_matmul(x.to(DEVICE), weights, path=path, config=config, out=out).cpu()
        assert (got.float() - ref).norm() / ref.norm() <= 1e-3, path


def test_v2_zeros_no_bias_and_default_dispatch() -> None:
    seed = _case_seed("test_v2_zeros_no_bias_and_default_dispatch")
    _check(1, 128, 24, 64, True, None, None, bias=False, zero_offset=0, seed=seed)
    _check(5, 128, 24, 64, False, None, None, bias=True, zero_offset=0, seed=seed + 1)
    # layout=None picks the fragment layout where the shape allows it
    _check(1, 128, 32, 64, True, None, None, bias=False, zero_offset=0, seed=seed + 2, layout=None)
    _check(5, 128, 48, 128, False, None, None, bias=True, zero_offset=0, seed=seed + 3, layout=None)
    _check(3, 128, 24, 64, False, None, None, seed=seed + 4, layout=None)  # N % 16 != 0: checkpoint layout
    _check(1, 128, 32, 64, True, None, None, seed=seed + 5, layout=None, dtype=torch.bfloat16)  # bf16 at M=1
    # every path forced without a config gets one (the frag GEMV is in no default row)
    for path in ("gemv", "gemm", "dequant"):
        _check(1, 128, 32, 64, True, path, None, seed=seed + 6, layout="frag")


# The fragment layout (llmctl_kernels/w4a16/layout.py): K and groups multiples of 64, N of 16.
FRAG_GEMV_SMALL = dict(BLOCK_N=32, BLOCK_K=128, num_warps=1, num_stages=1)
FRAG_GEMM_SMALL = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=1, num_stages=1)
FRAG_CASES = [
    (1, 320, 80, 64, False, "gemv", dict(FRAG_GEMV_SMALL, SPLIT_K=1)),  # N tail; BLOCK_K lowered to the group
    (1, 320, 80, 64, True, "gemv", dict(FRAG_GEMV_SMALL, BLOCK_K=64, SPLIT_K=3, GATHER_X=1)),  # in-kernel gather
    (1, 320, 80, 64, True, "gemv", dict(FRAG_GEMV_SMALL, BLOCK_K=64, SPLIT_K=3)),  # gather up front
    (3, 256, 48, 128, True, "gemv", dict(FRAG_GEMV_SMALL, SPLIT_K=2)),
    (2, 384, 32, -1, False, "gemv", dict(FRAG_GEMV_SMALL, SPLIT_K=1)),  # one group, two tiles
    (2, 512, 32, 128, False, "gemv", dict(FRAG_GEMV_SMALL, BLOCK_K=256, SPLIT_K=1)),  # BLOCK_K halved to the group
    (17, 192, 48, 64, False, "gemm", dict(FRAG_GEMM_SMALL, SPLIT_K=1)),
    (5, 320, 80, 64, True, "gemm", dict(FRAG_GEMM_SMALL, BLOCK_K=64, SPLIT_K=3)),
    (33, 256, 80, 128, True, "gemm", dict(FRAG_GEMM_SMALL, BLOCK_M=32, SPLIT_K=2)),
    (40, 320, 48, 64, False, "gemm", dict(FRAG_GEMM_SMALL, BLOCK_M=32, SPLIT_K=2, SCALE_IN_A=1)),  # scaled weights
    (3, 384, 16, -1, True, "gemm", dict(FRAG_GEMM_SMALL, BLOCK_N=16, SPLIT_K=1)),
    (17, 320, 80, 64, True, "dequant", {}),
    (3, 192, 48, -1, False, "dequant", {}),
    # cache-hint variants (KernelConfig.EVICT): x evict_last, then no hint at all
    (1, 320, 80, 64, True, "gemv", dict(FRAG_GEMV_SMALL, BLOCK_K=64, SPLIT_K=3, GATHER_X=1, EVICT=1)),
    (3, 256, 48, 128, False, "gemv", dict(FRAG_GEMV_SMALL, SPLIT_K=2, EVICT=2)),
    (5, 320, 80, 64, True, "gemm", dict(FRAG_GEMM_SMALL, BLOCK_K=64, SPLIT_K=3, EVICT=1)),
    (40, 320, 48, 64, False, "gemm", dict(FRAG_GEMM_SMALL, BLOCK_M=32, SPLIT_K=2, SCALE_IN_A=1, EVICT=2)),
]


@pytest.mark.parametrize("m,k,n,group,act_order,path,config", FRAG_CASES)
def test_frag_paths_match_reference(m, k, n, group, act_order, path, config) -> None:
    _check(m, k, n, group, act_order, path, config, seed=_case_seed(m, k, n, group, path, 1), layout="frag")


@pytest.mark.parametrize("path,config", [("gemv", dict(FRAG_GEMV_SMALL, SPLIT_K=2)),
                                         ("gemm", dict(FRAG_GEMM_SMALL, SPLIT_K=2))])
def test_frag_bf16_activations(path: str, config: dict) -> None:
    _check(3, 256, 48, 64, True, path, config, seed=_case_seed("test_frag_bf16_activations", path),
           dtype=torch.bfloat16, layout="frag")


@pytest.mark.parametrize("layout,path,config", [
    ("frag", "gemv", dict(FRAG_GEMV_SMALL, BLOCK_K=64, SPLIT_K=4, GATHER_X=1)),
    ("frag", "gemm", dict(FRAG_GEMM_SMALL, BLOCK_K=64, SPLIT_K=4)),
    ("gptq", "gemv", dict(GEMV_SMALL, SPLIT_K=3)),
    # the interpreter's bf16 dot is wrong (the checkpoint GEMM feeds it bf16 tiles): GPU only
    pytest.param("gptq", "gemm", dict(GEMM_SMALL, SPLIT_K=3, SWAP_AB=0),
                 marks=pytest.mark.skipif(DEVICE.type != "cuda", reason="bf16 dot in the interpreter")),
])
def test_bf16_split_k_sums_share_one_scratch_that_is_zero_between_launches(layout, path, config) -> None:
    """Every path's bf16 split-K adds into the one SplitKScratch (sized once), and the conversion
    to bf16 zeroes it again: launch after launch (in order and act-order, different M) is right
    and leaves it zero."""
    from llmctl_kernels.w4a16 import SplitKScratch

    gen = torch.Generator().manual_seed(_case_seed("split-k scratch", layout, path))
    k, n = 256, 48
    scratch = SplitKScratch(DEVICE, 8, n)
    for act_order, m in ((False, 3), (True, 2), (False, 5)):
        qweight, qzeros, scales, g_idx = _random_gptq(k, n, 64, act_order, gen)
        weights = prepare_w4a16_weights(qweight.to(DEVICE), qzeros.to(DEVICE), scales.to(DEVICE), g_idx.to(DEVICE),
                                        layout=layout)
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        ref = w4a16_matmul_reference(x.float(), qweight, qzeros, scales, g_idx)
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        got = w4a16_matmul(x.to(DEVICE), weights, path=path, config=config, out=out, scratch=scratch).cpu()
        assert (got.float() - ref).norm() / ref.norm() <= BF16_TOL
        assert float(scratch.sums.abs().sum()) == 0.0


def test_split_k_policy_refuses_what_the_scratch_was_not_sized_for() -> None:
    from llmctl_kernels.w4a16 import SPLIT_K_MAX_M, SplitKScratch

    assert SplitKScratch(DEVICE, 10**6, 16).max_rows == SPLIT_K_MAX_M  # sized for split-K products only
    gen = torch.Generator().manual_seed(_case_seed("split-k policy"))
    qweight, qzeros, scales, g_idx = _random_gptq(128, 32, 64, False, gen)
    weights = prepare_w4a16_weights(qweight, qzeros, scales, g_idx, layout="frag")
    config = dict(FRAG_GEMM_SMALL, BLOCK_K=64, SPLIT_K=2)
    with pytest.raises(AssertionError, match="exceeds the scratch"):
        w4a16_matmul(torch.randn(3, 128).bfloat16(), weights, path="gemm", config=config,
                     scratch=SplitKScratch(DEVICE, 2, 32))
    with pytest.raises(AssertionError, match="split-K at M="):
        w4a16_matmul(torch.randn(SPLIT_K_MAX_M + 1, 128).half(), weights, path="gemm", config=config)


def test_kernel_config_is_explicit_and_launchers_assert() -> None:
    from llmctl_kernels.w4a16 import KernelConfig

    with pytest.raises(ValueError, match="unknown kernel config keys"):
        KernelConfig.of({"BLOCK_N": 16, "GATHER": 1})
    with pytest.raises(ValueError, match="SPLIT_K"):
        KernelConfig(SPLIT_K=0)
    gen = torch.Generator().manual_seed(_case_seed("launcher asserts"))
    weights = prepare_w4a16_weights(*_random_gptq(128, 32, 64, True, gen), layout="frag")
    x = torch.randn(2, 128).half()
    with pytest.raises(AssertionError, match="BLOCK_M"):
        w4a16_matmul(x, weights, path="gemm", config=dict(BLOCK_N=32, BLOCK_K=64))
    with pytest.raises(AssertionError, match="GATHER_X=0"):
        w4a16_matmul(x, weights, path="gemm", config=dict(FRAG_GEMM_SMALL, GATHER_X=1))
    with pytest.raises(ValueError, match="path must be"):
        w4a16_matmul(x, weights, path="marlin")


def test_ptx_templates_render_every_placeholder() -> None:
    from llmctl_kernels.w4a16 import ptx

    with pytest.raises(ptx.PtxTemplateError, match="left unfilled"):
        ptx.render("mov.b32 one, @ONE2@; @TYPE@", {"ONE2": "0x3C003C00"})
    with pytest.raises(ptx.PtxTemplateError, match="fill no placeholder"):
        ptx.render("mov.b32 one, @ONE2@;", {"ONE2": "0x3C003C00", "TYPE": "f16x2"})
    for name in ("WORD_DOT_FP16", "NIBBLES_TO_FP16", "NIBBLES_TO_BF16", "FRAG_PAIRS_FP16", "FRAG_PAIRS_BF16",
                 "FRAG_SCALED_FP16", "FRAG_SCALED_BF16", "FRAG_DOT_FP16"):
        text = getattr(ptx, name).value
        assert "@" not in text and text.count("{") == text.count("}"), name
    assert "bf16x2" in ptx.FRAG_SCALED_BF16.value and "f16x2" not in ptx.FRAG_SCALED_BF16.value.replace("bf16x2", "")


def test_frag_repack_round_trips_and_places_codes_in_fragment_order() -> None:
    from llmctl_kernels.w4a16.layout import repack_frag, unpack_frag

    gen = torch.Generator().manual_seed(_case_seed("test_frag_repack_round_trips_and_places_codes_in_fragment_order"))
    k, n = 192, 48
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    qf = repack_frag(pack_qweight(q, 4))
    assert qf.shape == (k // 64, n // 16, 128) and qf.dtype == torch.int32
    assert torch.equal(unpack_frag(qf), q)
    # The documented mapping, word by word: lane = 4 lr + lc; pair j = 2 jhi + jlo holds rows k and k + 1.
    for kb, nb, lane, kbi in ((0, 0, 0, 0), (2, 1, 13, 3), (1, 2, 31, 2)):
        word = int(qf[kb, nb, 4 * lane + kbi]) & 0xFFFFFFFF
        lr, lc = divmod(lane, 4)
        for j in range(4):
            row = 16 * nb + 8 * (j % 2) + lr
            col = 64 * kb + 16 * kbi + 8 * (j // 2) + 2 * lc
            assert (word >> (4 * j)) & 15 == q[col, row] and (word >> (4 * j + 16)) & 15 == q[col + 1, row]


def test_frag_layout_rejects_ineligible_weights() -> None:
    gen = torch.Generator().manual_seed(0)
    qweight, qzeros, scales, g_idx = _random_gptq(128, 24, 64, False, gen)
    with pytest.raises(ValueError, match="frag layout needs"):
        prepare_w4a16_weights(qweight, qzeros, scales, g_idx, layout="frag")
    with pytest.raises(ValueError, match="layout must be"):
        prepare_w4a16_weights(qweight, qzeros, scales, g_idx, layout="marlin")


def test_bf16_activations_gemv() -> None:
    # bf16 is upcast right after loading, so the arithmetic is fp32 in the interpreter too.
    _check(3, 128, 24, 32, True, "gemv", dict(GEMV_SMALL, SPLIT_K=2), seed=_case_seed("test_bf16_activations_gemv"),
           dtype=torch.bfloat16)


def test_launcher_rejects_bad_input() -> None:
    gen = torch.Generator().manual_seed(0)
    weights = prepare_w4a16_weights(*_random_gptq(64, 8, 32, False, gen))
    with pytest.raises(ValueError, match="input features"):
        w4a16_matmul(torch.randn(2, 32).half(), weights)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        w4a16_matmul(torch.randn(2, 64), weights)
    with pytest.raises(ValueError, match="bias"):
        w4a16_matmul(torch.randn(2, 64).half(), weights, torch.zeros(9).half())
    with pytest.raises(ValueError, match="qweight"):
        prepare_w4a16_weights(weights.qweight.float(), weights.qzeros, weights.scales, None)
    with pytest.raises(ValueError, match="g_idx"):
        prepare_w4a16_weights(weights.qweight, weights.qzeros, weights.scales, torch.zeros(63, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("layout", ["frag", "gptq"])
def test_every_tuned_config_at_llama_shapes(dtype: torch.dtype, act_order: bool, layout: str) -> None:
    """Every configuration the tuner may pick, at a real shape, against the fp32 reference on the GPU."""
    from llmctl_kernels.w4a16 import w4a16_dequantize
    from llmctl_kernels.w4a16.tune import candidates, random_layer

    k, n = 4096, 6144
    seed = _case_seed("test_every_tuned_config_at_llama_shapes", dtype, act_order, layout)
    w = random_layer(n, k, 128, act_order, DEVICE, seed=seed, layout=layout)
    dense = w4a16_dequantize(w, torch.float32)
    # One configuration per kind of launch (the tuner checks every configuration's error itself).
    bias = torch.randn(n, device=DEVICE, dtype=dtype)
    for m in (1, 3, 16, 100, 300):
        x = torch.randn(m, k, device=DEVICE, dtype=dtype)
        ref = x.float() @ dense + bias.float()
        kinds = {}
        for path, config in candidates(m, layout):
            kind = (path, config.get("SPLIT_K", 1) > 1, config.get("SWAP_AB", 0), config.get("PREFETCH", 0),
                    config.get("INT_DOT", 0), config.get("PAIRS", 0), config.get("HALF2", 0),
                    config.get("num_warps") if layout == "frag" else 0)
            kinds.setdefault(kind, (path, config))
        for path, config in kinds.values():
            out = torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)
            got = w4a16_matmul(x, w, bias, path=path, config=config, out=out)
            rel = float((got.float() - ref).norm() / ref.norm())
            tol = 2e-3 if dtype == torch.float16 else 8e-3
            assert rel <= tol and not torch.isnan(got).any(), f"{path} {config} M={m}: rel err {rel:.2e}"


def test_tuner_table_picks_fastest_and_merges_rows() -> None:
    from llmctl_kernels.w4a16.tune import build_table

    a, b = {"BLOCK_N": 64}, {"BLOCK_N": 128}
    recs = []
    for (n, k), times in {(8, 32): {1: (1.0, 2.0), 2: (1.0, 2.0), 64: (3.0, 1.0)},
                          (16, 32): {1: (2.0, 1.5), 2: (1.0, 2.0), 64: (3.0, 1.0)}}.items():
        for m, (ta, tb) in times.items():
            recs += [dict(n=n, k=k, m=m, path="gemv", config=a, ms=ta, rel_err=1e-4),
                     dict(n=n, k=k, m=m, path="gemm", config=b, ms=tb, rel_err=1e-4),
                     # fast but just past the accuracy bar (1e-3): never picked
                     dict(n=n, k=k, m=m, path="gemm", config={"BLOCK_N": 1}, ms=0.1, rel_err=1.1e-3),
                     dict(n=n, k=k, m=m, path="gemm", config={"BLOCK_N": 2}, error="OutOfResources")]
    table = build_table(recs)
    assert table["8x32"] == [{"max_m": 2, "path": "gemv", "config": a}, {"max_m": None, "path": "gemm", "config": b}]
    assert table["16x32"][0] == {"max_m": 1, "path": "gemm", "config": b}
    # geomean at M=1: a = sqrt(1*2), b = sqrt(2*1.5): a wins
    assert table["default"] == [{"max_m": 2, "path": "gemv", "config": a}, {"max_m": None, "path": "gemm", "config": b}]


def test_splice_rows_keeps_new_rows_up_to_m_and_old_rows_beyond() -> None:
    from llmctl_kernels.w4a16.tune import splice_rows

    new = [{"max_m": 1, "path": "gemv", "config": {"a": 1}}, {"max_m": None, "path": "gemm", "config": {"b": 1}}]
    old = [{"max_m": 4, "path": "gemv", "config": {"a": 0}}, {"max_m": 128, "path": "gemm", "config": {"b": 0}},
           {"max_m": None, "path": "dequant", "config": {}}]
    assert splice_rows(new, old, 64) == [
        {"max_m": 1, "path": "gemv", "config": {"a": 1}}, {"max_m": 64, "path": "gemm", "config": {"b": 1}},
        {"max_m": 128, "path": "gemm", "config": {"b": 0}}, {"max_m": None, "path": "dequant", "config": {}}]
    # an old row that ends at or below the splice point is gone; one the new rows already end with merges
    assert splice_rows(new, [{"max_m": None, "path": "gemm", "config": {"b": 1}}], 64) == new


@pytest.mark.parametrize("bits", [2, 8])
def test_other_bit_widths_on_every_path(bits: int) -> None:
    seed = _case_seed("test_other_bit_widths_on_every_path", bits)
    gen = torch.Generator().manual_seed(seed)
    k, n = 128, 32
    qweight, qzeros, scales, g_idx = _random_gptq(k, n, 32, True, gen, bits=bits)
    weights = prepare_w4a16_weights(qweight.to(DEVICE), qzeros.to(DEVICE), scales.to(DEVICE), g_idx.to(DEVICE), bits)
    x = torch.randn(3, k, generator=gen).half()
    ref = w4a16_matmul_reference(x.float(), qweight, qzeros, scales, g_idx, bits=bits)
    for path, config in (("gemv", dict(GEMV_SMALL, SPLIT_K=2)), ("gemm", dict(GEMM_SMALL, SPLIT_K=2, SWAP_AB=0)),
                         ("dequant", {})):
        out = torch.full((3, n), float("nan"), dtype=torch.float16, device=DEVICE)
        got = w4a16_matmul(x.to(DEVICE), weights, path=path, config=config, out=out).cpu()
        rel = (got.float() - ref).norm() / ref.norm()
        assert rel <= 1e-3, f"{bits}-bit {path}: relative error {rel:.2e} (seed {seed})"
