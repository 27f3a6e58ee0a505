"""Programmatic dependent launch (llmctl_kernels/launch.py): off wherever it cannot run, and on a Hopper GPU
(`-m gpu`) a chain of dependent kernels captured in a CUDA graph gives the same result with it as
without it (a kernel that read its input before the previous kernel finished would not)."""

from __future__ import annotations

import pytest
import torch

from llmctl_kernels.launch import launch_options, pdl_enabled, set_pdl


def test_pdl_is_off_on_the_cpu_and_in_the_interpreter(monkeypatch):
    assert launch_options(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl_enabled(torch.device("cuda", 0))  # the interpreter has no grid dependency control


def test_set_pdl_returns_the_previous_setting():
    previous = set_pdl(False)
    try:
        assert set_pdl(True) is False
        assert set_pdl(False) is True
    finally:
        set_pdl(previous)


def _chain(x, layers, norm_weight):
    """rms_norm (with the residual add), then a W4A16 linear 4096 -> 4096, once per layer: every
    kernel reads what the one before it wrote, and every kernel here takes part in PDL."""
    from llmctl_kernels.fused_ops import rms_norm
    from llmctl_kernels.w4a16 import w4a16_matmul

    residual = x.clone()
    h = x
    for w in layers:
        h = rms_norm(h, norm_weight, 1e-5, residual)
        h = w4a16_matmul(h, w)
    return h, residual


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64, 128])  # 128: products launched without PDL, between kernels with it
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dependent_chain_in_a_graph_matches_without_pdl(m, dtype):
    from llmctl_kernels.w4a16.tune import random_layer

    device = torch.device("cuda")
    if torch.cuda.get_device_capability(device)[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90 or later")
    layers = [random_layer(4096, 4096, 128, act_order=i % 2 == 1, device=device, seed=i) for i in range(6)]
    norm_weight = torch.rand(4096, device=device, dtype=dtype) + 0.5
    x = torch.randn(m, 4096, device=device, dtype=dtype)

    previous = set_pdl(False)
    try:
        ref, ref_res = _chain(x, layers, norm_weight)
        set_pdl(True)
        out = torch.empty_like(ref)
        res = torch.empty_like(ref)
        _chain(x, layers, norm_weight)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            _chain(x, layers, norm_weight)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            h, r = _chain(x, layers, norm_weight)
            out.copy_(h)
            res.copy_(r)
        for _ in range(3):
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            # split-K atomics add in any order: equal up to rounding, not bit for bit
            rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            assert rel < 2e-2, rel
            assert torch.isfinite(out).all()
            assert ((res.float() - ref_res.float()).norm() / ref_res.float().norm()).item() < 2e-2
    finally:
        set_pdl(previous)
