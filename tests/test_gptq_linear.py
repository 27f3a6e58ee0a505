"""GPTQLinearMethod inside our linear layers: fused shard loading, CPU reference, CUDA kernels."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from llmctl.config import GPTQConfig
from llmctl.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from llmctl.layers.quantization import GPTQLinearMethod, gpu_dense_fallback_warning
from llmctl.quant.gptq import HessianAccumulator, gptq_quantize
from llmctl.quant.packing import format_for, pack_result
from llmctl_kernels.reference import dequantize_gptq


def _packed(n: int, k: int, settings: GPTQConfig, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, k, generator=g)
    acc = HessianAccumulator(k)
    acc.add_batch(x)
    w = torch.randn(n, k, generator=g) * 0.05
    result = gptq_quantize(w, acc.hessian, settings, acc.num_tokens)
    return result, pack_result(result, settings.bits, format_for(settings.sym))


@pytest.mark.parametrize("bits, sym, desc_act", [(4, True, False), (3, False, True), (8, True, True), (2, False, False)])
@pytest.mark.filterwarnings("error")  # the CPU path is the design for every width: no warning
def test_fused_gate_up_loads_shard_by_shard_and_matches_the_dequantized_weights(bits, sym, desc_act):
    settings = GPTQConfig(bits=bits, group_size=32, sym=sym, desc_act=desc_act)
    # Both shards of one fused layer share g_idx: quantize them as one matrix, then split.
    fused, _ = _packed(128, 96, settings, seed=bits)
    from llmctl.quant.packing import split_result

    method = GPTQLinearMethod(replace(settings, checkpoint_format=format_for(sym)))
    layer = MergedColumnParallelLinear(96, [64, 64], linear_method=method, params_dtype=torch.float32)
    for shard_id, part in enumerate(split_result(fused, [64, 64])):
        for name, tensor in pack_result(part, bits, format_for(sym)).tensors("x").items():
            param = getattr(layer, name.split(".")[-1])
            param.weight_loader(param, tensor, shard_id)
    layer.process_weights_after_loading()
    x = torch.randn(5, 96)
    torch.testing.assert_close(layer(x), x @ fused.dequantize().t(), rtol=1e-5, atol=1e-5)


def test_row_parallel_layer_with_bias():
    settings = GPTQConfig(bits=4, group_size=64)
    result, packed = _packed(64, 128, settings, seed=7)
    layer = RowParallelLinear(128, 64, bias=True, linear_method=GPTQLinearMethod(GPTQConfig(bits=4, group_size=64)),
                              params_dtype=torch.float32)
    for name, tensor in {**packed.tensors("x"), "x.bias": torch.randn(64)}.items():
        param = getattr(layer, name.split(".")[-1])
        param.weight_loader(param, tensor)
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x), x @ result.dequantize().t() + layer.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("desc_act", [False, True])
def test_cuda_path_runs_the_triton_kernels_and_matches_the_reference(desc_act):
    settings = GPTQConfig(bits=4, group_size=128, desc_act=desc_act)
    result, packed = _packed(512, 1024, settings, seed=11)
    layer = RowParallelLinear(1024, 512, linear_method=GPTQLinearMethod(settings),
                              params_dtype=torch.float16).cuda()
    for name, tensor in packed.tensors("x").items():
        param = getattr(layer, name.split(".")[-1])
        param.weight_loader(param, tensor.cuda())
    layer.process_weights_after_loading()
    assert layer.w4a16 is not None and layer.w4a16.layout == "frag"
    assert layer.qweight.numel() == 0  # the repacked copy replaces the checkpoint's codes
    dense = dequantize_gptq(packed.qweight, packed.qzeros, packed.scales.float(), packed.g_idx, 4, 1).cuda()
    for m in (1, 7, 300):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.float16)
        torch.testing.assert_close(layer(x).float(), x.float() @ dense, rtol=2e-2, atol=2e-2)
    x = torch.randn(5, 1024, device="cuda")  # fp32 activations: dequantized from the prepared weights
    torch.testing.assert_close(layer(x), x @ dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_only_3_bit_on_a_gpu_warns_that_it_dequantizes_every_forward(bits):
    message = gpu_dense_fallback_warning(bits, torch.device("cuda", 0))
    assert (message is not None) == (bits == 3)
    assert gpu_dense_fallback_warning(bits, "cpu") is None
    if message:
        assert "3-bit" in message and "dequantizes" in message


@pytest.mark.gpu
def test_3_bit_on_a_gpu_warns_once_at_load_and_runs_the_dense_path():
    settings = GPTQConfig(bits=3, group_size=32, sym=False)
    result, packed = _packed(64, 128, settings, seed=13)
    method = GPTQLinearMethod(replace(settings, checkpoint_format=format_for(False)))
    layers = [RowParallelLinear(128, 64, linear_method=method, params_dtype=torch.float16).cuda() for _ in range(2)]
    for layer in layers:
        for name, tensor in packed.tensors("x").items():
            param = getattr(layer, name.split(".")[-1])
            param.weight_loader(param, tensor.cuda())
    with pytest.warns(UserWarning, match="3-bit GPTQ weights have no GPU kernel") as record:
        for layer in layers:
            layer.process_weights_after_loading()
    assert len(record) == 1  # one model, one warning
    assert all(layer.w4a16 is None for layer in layers)
    x = torch.randn(5, 128, device="cuda", dtype=torch.float16)
    expected = x.float() @ result.dequantize().t().cuda()
    torch.testing.assert_close(layers[0](x).float(), expected, rtol=2e-2, atol=2e-2)
