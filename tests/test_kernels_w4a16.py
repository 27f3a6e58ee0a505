"""GPTQ pack/unpack and the W4A16 Triton kernels against the fp32 reference.

The Triton kernels run under TRITON_INTERPRET=1 on the CPU at small shapes; the GPU tests
(`-m gpu`) run the same checks at real shapes.
"""

from __future__ import annotations

import os

if not os.environ.get("CUDA_VISIBLE_DEVICES") and "TRITON_INTERPRET" not in os.environ:
    # Must be set before triton is imported anywhere in this process.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from kernels.reference import (
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
