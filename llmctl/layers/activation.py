"""Activations of the MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.layers import use_triton


class SiluAndMul(nn.Module):
    """SwiGLU on a fused gate_up output: silu(gate) * up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., 2*I] (gate then up) -> [..., I]
        if use_triton(x) and x.stride(-1) == 1:
            from llmctl_kernels.fused_ops import silu_and_mul

            return silu_and_mul(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], x.shape[-1] // 2)
        return self.forward_native(x)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
