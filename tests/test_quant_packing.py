"""GPTQ results <-> stored checkpoint tensors: exact round trips, v1/v2, fused splits."""

from __future__ import annotations

import pytest
import torch

from llmctl.config import GPTQConfig
from llmctl.errors import QuantizationError
from llmctl.quant.gptq import GPTQResult, HessianAccumulator, gptq_quantize
from llmctl.quant.packing import (
    FORMAT_V1,
    FORMAT_V2,
    check_packable,
    format_for,
    pack_result,
    split_result,
    unpack_linear,
    zero_offset,
)
from llmctl_kernels.reference import dequantize_gptq


def _random_result(bits: int, sym: bool, act_order: bool, n: int = 64, k: int = 128, gs: int = 32,
                   seed: int = 0) -> GPTQResult:
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    num_groups = k // gs
    codes = torch.randint(0, maxq + 1, (n, k), generator=g, dtype=torch.int32)
    if sym:
        zeros = torch.full((num_groups, n), (maxq + 1) // 2, dtype=torch.int32)
    else:
        zeros = torch.randint(0, maxq + 1, (num_groups, n), generator=g, dtype=torch.int32)
    scales = (torch.rand(num_groups, n, generator=g) * 0.1 + 1e-3).half()
    g_idx = torch.arange(k, dtype=torch.int32) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    return GPTQResult(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, loss=0.0, damp_percent=0.01)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_pack_unpack_round_trip_is_exact(bits, sym, act_order):
    result = _random_result(bits, sym, act_order, seed=bits * 10 + sym * 2 + act_order)
    for fmt in ([FORMAT_V1, FORMAT_V2] if sym else [FORMAT_V2]):
        packed = pack_result(result, bits, fmt)
        assert packed.qweight.dtype == torch.int32 and packed.qweight.shape == (128 * bits // 32, 64)
        assert packed.qzeros.shape == (4, 64 * bits // 32)
        back = unpack_linear(packed, bits, fmt)
        assert torch.equal(back.codes, result.codes)
        assert torch.equal(back.zeros, result.zeros)
        assert torch.equal(back.scales, result.scales)
        assert torch.equal(back.g_idx, result.g_idx)
        # The reference dequantizer (what every loader computes) agrees with ours.
        dense = dequantize_gptq(packed.qweight, packed.qzeros, packed.scales.float(), packed.g_idx, bits,
                                zero_offset(fmt))
        torch.testing.assert_close(dense.t(), result.dequantize(), rtol=0, atol=1e-6)


def test_v1_stores_zero_minus_one_and_refuses_a_zero_point_of_zero():
    result = _random_result(4, sym=True, act_order=False)
    packed = pack_result(result, 4, FORMAT_V1)
    # Symmetric 4-bit: zero 8 stored as 7 in every nibble (AutoGPTQ's 0x77777777).
    assert torch.all(packed.qzeros == 0x77777777)
    result.zeros[0, 0] = 0
    with pytest.raises(QuantizationError, match="cannot store a zero point of 0"):
        pack_result(result, 4, FORMAT_V1)
    assert format_for(sym=False) == FORMAT_V2 and format_for(sym=True) == FORMAT_V1


def test_dequantized_weight_is_within_half_a_step_of_what_gptq_chose():
    torch.manual_seed(0)
    n, k = 96, 256
    x = torch.randn(512, k) * (1 + 4 * torch.rand(k))
    acc = HessianAccumulator(k)
    acc.add_batch(x)
    w = torch.randn(n, k) * 0.05
    for settings in (GPTQConfig(bits=4, group_size=64), GPTQConfig(bits=3, group_size=32, sym=False, desc_act=True)):
        result = gptq_quantize(w, acc.hessian, settings, acc.num_tokens)
        fmt = format_for(settings.sym)
        packed = pack_result(result, settings.bits, fmt)
        dense = dequantize_gptq(packed.qweight, packed.qzeros, packed.scales.float(), packed.g_idx,
                                settings.bits, zero_offset(fmt)).t()
        step = result.scales.float()[result.g_idx.long()].t()  # [N, K]
        chosen = result.dequantize()
        assert torch.all((dense - chosen).abs() <= step / 2)
        # And the chosen values sit on the grid: (w / scale + zero) is an integer code.
        grid = chosen / step + result.zeros.float()[result.g_idx.long()].t()
        torch.testing.assert_close(grid, grid.round(), rtol=0, atol=1e-3)


def test_split_result_gives_each_projection_its_rows_and_the_shared_g_idx():
    result = _random_result(4, sym=True, act_order=True, n=96)
    q, k, v = split_result(result, [64, 16, 16])
    assert torch.equal(torch.cat([q.codes, k.codes, v.codes]), result.codes)
    assert torch.equal(torch.cat([q.scales, k.scales, v.scales], dim=1), result.scales)
    assert torch.equal(k.g_idx, result.g_idx)
    with pytest.raises(QuantizationError, match="do not add up"):
        split_result(result, [64, 16])


def test_check_packable_names_the_layer_and_the_problem():
    with pytest.raises(QuantizationError, match="group_size 128 does not divide in_features 576 of q_proj"):
        check_packable("q_proj", 576, 576, 4, 128)
    with pytest.raises(QuantizationError, match="multiples of 32"):
        check_packable("k_proj", 576, 48, 3, 64)
    check_packable("q_proj", 576, 576, 4, 64)
