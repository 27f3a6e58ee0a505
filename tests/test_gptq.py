"""GPTQ on one weight matrix: the grid, the orderings, damping, and that it beats rounding."""

from __future__ import annotations

import pytest
import torch

from llmctl.config import GPTQConfig
from llmctl.errors import QuantizationError
from llmctl.quant.gptq import (
    HessianAccumulator,
    fit_grid,
    gptq_quantize,
    rtn_quantize,
)


def _problem(n: int = 64, k: int = 256, tokens: int = 1024, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # Correlated inputs with uneven channel energy, as real activations have.
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = (torch.randn(tokens, k, generator=g) @ mix) * (1 + 5 * torch.rand(k, generator=g))
    w = torch.randn(n, k, generator=g) * 0.05
    return w, x


def _hessian(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[1])
    for chunk in x.split(300):
        acc.add_batch(chunk)
    return acc.hessian


def _output_error(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (w - wq).t()) ** 2).sum())


def test_hessian_accumulator_is_2_over_n_xtx_across_batches():
    _, x = _problem()
    torch.testing.assert_close(_hessian(x), 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-4)


def test_symmetric_grid_uses_the_autogptq_zero_and_fp16_scales():
    w = torch.tensor([[-1.0, 0.5, 0.25], [0.0, 0.0, 0.0]])
    scale, zero = fit_grid(w, bits=4, sym=True)
    assert zero.tolist() == [8.0, 8.0]
    assert scale[0].item() == torch.tensor(2.0 / 15).half().float().item()
    assert scale[1].item() == torch.tensor(2.0 / 15).half().float().item()  # an all-zero row gets [-1, 1]
    scale, zero = fit_grid(torch.tensor([[0.1, 0.7]]), bits=4, sym=False)
    assert zero.item() == 0.0  # min clamped up to 0, so zero = round(-0 / scale)


@pytest.mark.parametrize("kwargs", [
    dict(), dict(act_group_aware=False), dict(desc_act=True), dict(desc_act=True, static_groups=True),
    dict(sym=False), dict(bits=3), dict(bits=2), dict(bits=8), dict(group_size=-1),
])
def test_gptq_beats_round_to_nearest_in_every_mode(kwargs):
    w, x = _problem()
    settings = GPTQConfig(group_size=kwargs.pop("group_size", 64), **kwargs)
    result = gptq_quantize(w, _hessian(x), settings, x.shape[0])
    assert int(result.codes.min()) >= 0 and int(result.codes.max()) <= settings.maxq
    rtn = rtn_quantize(w, settings)
    assert _output_error(w, result.dequantize(), x) < 0.9 * _output_error(w, rtn.dequantize(), x)


def test_act_order_g_idx_assigns_group_size_columns_to_each_group():
    w, x = _problem()
    h = _hessian(x)
    desc = gptq_quantize(w, h, GPTQConfig(group_size=64, desc_act=True))
    counts = torch.bincount(desc.g_idx.long())
    assert counts.tolist() == [64, 64, 64, 64]
    # The most active column is quantized first, so it opens group 0.
    assert int(desc.g_idx[int(torch.argmax(torch.diag(h)))]) == 0
    assert not torch.equal(desc.g_idx, torch.arange(256, dtype=torch.int32) // 64)
    # Group-aware ordering and static groups keep groups contiguous (no g_idx cost).
    natural = torch.arange(256, dtype=torch.int32) // 64
    for settings in (GPTQConfig(group_size=64), GPTQConfig(group_size=64, desc_act=True, static_groups=True)):
        assert torch.equal(gptq_quantize(w, h, settings).g_idx, natural)


def test_dead_columns_are_zeroed_and_a_singular_hessian_is_damped():
    w, x = _problem()
    x[:, 5] = 0  # a channel the calibration never excites
    x[:, 7] = x[:, 8]  # two identical channels: H is singular
    result = gptq_quantize(w, _hessian(x), GPTQConfig(group_size=64, damp_percent=1e-9))
    deq = result.dequantize()
    assert torch.all(deq[:, 5] == 0)
    assert torch.isfinite(deq).all()


def test_a_hessian_that_no_damping_can_fix_raises_a_quantization_error():
    w, x = _problem()
    h = _hessian(x)
    h[3, 3] = float("nan")
    with pytest.raises(QuantizationError, match="not positive definite"):
        gptq_quantize(w, h, GPTQConfig(group_size=64))


def test_group_size_must_divide_in_features():
    w, x = _problem(k=96, tokens=256)
    with pytest.raises(QuantizationError, match="group_size 64 does not divide in_features 96"):
        gptq_quantize(w, _hessian(x), GPTQConfig(group_size=64))


def test_gptq_beats_round_to_nearest_on_a_real_layer_of_the_default_model(default_model_dir):
    from llmctl.models.loader import load_model, load_tokenizer
    from llmctl.quant.calibration import calibration_batch, load_calibration_texts

    model = load_model(default_model_dir, dtype="float32", device="cpu")
    del model.model.layers[4:]  # only layer 3's inputs are needed
    ids = calibration_batch(load_tokenizer(default_model_dir), load_calibration_texts(None), 16, 256, seed=1)
    # qkv (K=576): 2,048 fitting tokens are plenty. (down_proj, K=1536, needs over 10k
    # tokens before GPTQ generalizes beyond its calibration set.)
    layer = model.model.layers[3].self_attn.qkv_proj
    inputs = []
    handle = layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(ids, torch.arange(ids.shape[1]).expand_as(ids))
    handle.remove()
    x = torch.cat(inputs)
    fit, held_out = x[: x.shape[0] // 2], x[x.shape[0] // 2:]
    w = layer.weight.data.clone()
    settings = GPTQConfig(bits=4, group_size=64)
    gptq = gptq_quantize(w, _hessian(fit), settings, fit.shape[0]).dequantize()
    rtn = rtn_quantize(w, settings).dequantize()
    assert _output_error(w, gptq, fit) < 0.5 * _output_error(w, rtn, fit)
    # It generalizes: better on tokens it never saw too.
    assert _output_error(w, gptq, held_out) < 0.8 * _output_error(w, rtn, held_out)
