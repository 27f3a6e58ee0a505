"""RMSNorm, with the residual add folded in (vLLM's fused form)."""

from __future__ import annotations

import torch
from torch import nn

from llmctl.layers import use_triton


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, params_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # x, residual: [..., D]. With a residual, returns (norm(x + residual), x + residual).
        if use_triton(x) and x.stride(-1) == 1:
            return self.forward_triton(x, residual)
        return self.forward_native(x, residual)

    def forward_native(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            # The sum is rounded to the model dtype before normalizing, as the HF
            # reference does, so fp16/bf16 runs agree with it.
            x = x + residual
            residual = x
        orig_dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(orig_dtype)
        return out if residual is None else (out, residual)

    def forward_triton(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # One kernel; the residual is updated in place (its old value is not needed again).
        from llmctl_kernels.fused_ops import rms_norm

        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if residual is None:
            return rms_norm(x2, self.weight, self.eps).view(shape)
        r2 = residual.reshape(-1, shape[-1]).contiguous()
        out = rms_norm(x2, self.weight, self.eps, r2)
        return out.view(shape), r2.view(shape)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
