"""Activations of the MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """SwiGLU on a fused gate_up output: silu(gate) * up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., 2*I] (gate then up) -> [..., I]
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
