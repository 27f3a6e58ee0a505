"""The fused RMSNorm / rotary / SiLU-and-mul kernels against the layers' torch forms: under the
CPU interpreter here, compiled where CUDA is present. Fresh random inputs, odd sizes."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") == "1" else "cuda"

pytest.importorskip("triton")

from llmctl.layers.activation import SiluAndMul  # noqa: E402
from llmctl.layers.layernorm import RMSNorm  # noqa: E402
from llmctl.layers.rotary import RotaryEmbedding  # noqa: E402
from llmctl_kernels.fused_ops import rms_norm, rotary_embedding, silu_and_mul  # noqa: E402

DTYPES = [torch.float32, torch.float16]


def _rand(*shape, dtype, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def _close(got, want, dtype):
    # One fp16 rounding step apart at most where the torch form rounds an intermediate differently.
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 200])
def test_rms_norm_with_and_without_residual(dtype, hidden):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    norm = RMSNorm(hidden, eps=1e-5, params_dtype=dtype).to(DEVICE)
    norm.weight.data = _rand(hidden, dtype=dtype, gen=gen)
    x, res = _rand(7, hidden, dtype=dtype, gen=gen, scale=3.0), _rand(7, hidden, dtype=dtype, gen=gen)
    _close(rms_norm(x, norm.weight, norm.eps), norm.forward_native(x), dtype)
    want_out, want_res = norm.forward_native(x, res.clone())
    res_inplace = res.clone()
    got_out = rms_norm(x, norm.weight, norm.eps, res_inplace)
    _close(got_out, want_out, dtype)
    torch.testing.assert_close(res_inplace, want_res, rtol=0, atol=0)  # the sum is rounded identically


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (6, 1, 64)])
def test_rotary_in_place_matches_the_torch_form(dtype, heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    rope = RotaryEmbedding(head_dim, max_position=300, base=10000.0,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}).to(DEVICE)
    positions = torch.randint(0, 300, (9,), generator=gen).to(DEVICE)
    # q and k as views of one fused qkv row, as the attention layer hands them over.
    qkv = _rand(9, (heads + 2 * kv_heads) * head_dim, dtype=dtype, gen=gen)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    want_q, want_k = rope.forward_native(positions, q.clone(), k.clone())
    v_before = v.clone()
    rotary_embedding(positions, q, k, rope.cos_sin_cache, head_dim)
    _close(q, want_q, dtype)
    _close(k, want_k, dtype)
    assert torch.equal(v, v_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [48, 1100])
def test_silu_and_mul(dtype, inter):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    x = _rand(5, 2 * inter, dtype=dtype, gen=gen, scale=4.0)
    _close(silu_and_mul(x), SiluAndMul().forward_native(x), dtype)
