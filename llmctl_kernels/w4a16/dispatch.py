"""`w4a16_matmul`: checks its operands, picks a path and a configuration by M (config.py's tables)
and launches it.

Paths: `gemv` (split-K on the CUDA cores), `gemm` (tensor cores, split-K at small M) and `dequant`
(dequantize to fp16, then cuBLAS), each for both layouts (layout.py). Split-K partial sums meet as
scratch.py says; pass the engine's `SplitKScratch` so that bf16 products reuse one buffer sized
at start (without one, a bf16 split-K product zeroes a temporary).
"""

from __future__ import annotations

import torch

from llmctl_kernels.w4a16.config import PATHS, KernelConfig, default_config, select_path
from llmctl_kernels.w4a16.dequant import w4a16_dequant_matmul
from llmctl_kernels.w4a16.frag_gemm import frag_gemm
from llmctl_kernels.w4a16.frag_gemv import frag_gemv
from llmctl_kernels.w4a16.gemm import w4a16_gemm
from llmctl_kernels.w4a16.gemv import w4a16_gemv
from llmctl_kernels.w4a16.layout import W4A16Weights
from llmctl_kernels.w4a16.scratch import SplitKScratch


def _check_operands(x: torch.Tensor, weights: W4A16Weights, bias: torch.Tensor | None) -> None:
    k, n = weights.in_features, weights.out_features
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x must be fp16 or bf16, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the weights {k}")
    if x.device != weights.qweight.device:
        raise ValueError(f"x is on {x.device}, the weights on {weights.qweight.device}")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{n}] tensor, got {tuple(bias.shape)}")


def pick(m: int, weights: W4A16Weights, x: torch.Tensor) -> tuple[str, KernelConfig]:
    """The (path, config) the table gives an [m, K] product of x's dtype over these weights."""
    n, k = weights.out_features, weights.in_features
    path, config = select_path(m, n, k, x.device, weights.layout)
    if path == "gemv" and weights.layout == "frag" and x.dtype == torch.bfloat16:
        # The tables are measured with fp16 x; with bf16 the GEMV's fp32 arithmetic loses to the
        # tensor cores (H200, M=1: 9-16% on qkv, o and down), so take the choice for M=2.
        path, config = select_path(2, n, k, x.device, weights.layout)
    return path, config


def w4a16_matmul(
    x: torch.Tensor,  # [..., K] fp16/bf16
    weights: W4A16Weights,
    bias: torch.Tensor | None = None,  # [N]
    *,
    scratch: SplitKScratch | None = None,
    path: str | None = None,
    config: KernelConfig | dict | None = None,
    out: torch.Tensor | None = None,  # [M, N]; for tests (poisoned outputs) and the tuner
) -> torch.Tensor:
    """x @ dequant(W) (+ bias) -> [..., N] in x's dtype, fp32 accumulation."""
    _check_operands(x, weights, bias)
    k, n = weights.in_features, weights.out_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if out is None:
        out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    elif out.shape != (m, n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{m}, {n}] {x.dtype} tensor")
    if m == 0:
        return out.reshape(*lead, n)
    if path is None:
        path, picked = pick(m, weights, x2)
        config = picked if config is None else KernelConfig.of(config)
    elif path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    else:
        config = default_config(path, weights.layout) if config is None else KernelConfig.of(config)
    frag = weights.layout == "frag"
    if path == "gemv":
        (frag_gemv if frag else w4a16_gemv)(x2, weights, bias, out, config, scratch)
    elif path == "gemm":
        (frag_gemm if frag else w4a16_gemm)(x2, weights, bias, out, config, scratch)
    else:
        w4a16_dequant_matmul(x2, weights, bias, out)
    return out.reshape(*lead, n)
