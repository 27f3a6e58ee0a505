"""Model building blocks. Each op with a Triton kernel runs it on CUDA tensors and its
torch form elsewhere (the CPU, and the reference the kernels are tested against)."""

from __future__ import annotations

import functools

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and triton_available()
