"""GPTQ (Frantar et al. 2022) for one weight matrix, given the Hessian of its inputs.

`HessianAccumulator` builds H = 2/n * sum(x x^T) over calibration tokens;
`gptq_quantize` turns (W, H) into integer codes, per-group scales and zeros, and
`g_idx`, in the grid AutoGPTQ/GPTQModel checkpoints store:

    w ~= scale * (q - zero),  q in [0, 2^bits - 1],  sym: zero = 2^(bits-1)

Column processing order:
    desc_act            all columns by decreasing H diagonal; g_idx records each
                        column's group (groups are formed in processing order)
    act_group_aware     (GPTQModel's default) the same idea without g_idx cost:
                        groups stay contiguous in the original order, but are
                        processed by decreasing max H diagonal, and columns inside
                        a group by decreasing H diagonal
    neither             natural order

One refinement over the reference loop that changes nothing in the format: scales
are rounded to fp16 before use, so the error GPTQ compensates is the error of the
weights the checkpoint really stores. As in the reference, a group's grid is fitted
when its first column comes up, to the weights as updated up to the start of the
current 128-column block (fitting after the in-block updates measured no better).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmctl.config import GPTQConfig
from llmctl.errors import QuantizationError

BLOCK_SIZE = 128
# Added to damp_percent for each retry when the damped Hessian is not positive definite.
DAMP_INCREMENT = 0.01
_FP16_TINY = 2.0**-14


@dataclass
class GPTQResult:
    """Codes and grid in the original column order, ready to pack."""

    codes: torch.Tensor  # int32 [N, K], each in [0, maxq]
    scales: torch.Tensor  # fp16 [G, N]
    zeros: torch.Tensor  # int32 [G, N], the true zero point (v2 meaning)
    g_idx: torch.Tensor  # int32 [K]
    loss: float  # sum over rows of (w - q)^2 / [H^-1]_ii / 2, normalised per token
    damp_percent: float  # the damping that made H positive definite

    def dequantize(self) -> torch.Tensor:
        """The fake-quantized weight [N, K] in fp32."""
        g = self.g_idx.long()
        scales = self.scales.float()[g].t()  # [N, K]
        return scales * (self.codes.float() - self.zeros.float()[g].t())


class HessianAccumulator:
    """Running H = 2/n * X X^T (n = tokens seen), in fp32 on the inputs' device."""

    def __init__(self, num_columns: int, device: torch.device | str = "cpu") -> None:
        self.hessian = torch.zeros(num_columns, num_columns, dtype=torch.float32, device=device)
        self.num_tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        # x: [..., K]
        x = x.reshape(-1, x.shape[-1]).to(device=self.hessian.device, dtype=torch.float32)
        n = x.shape[0]
        if n == 0:
            return
        total = self.num_tokens + n
        self.hessian.mul_(self.num_tokens / total)
        x = x * math.sqrt(2.0 / total)
        self.hessian.addmm_(x.t(), x)
        self.num_tokens = total


def fit_grid(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max grid per row of w [N, C] -> (scale fp32 [N] holding fp16 values, zero fp32 [N])."""
    maxq = 2**bits - 1
    zero = torch.zeros(w.shape[0], device=w.device, dtype=torch.float32)
    xmin = torch.minimum(w.min(dim=1).values, zero)
    xmax = torch.maximum(w.max(dim=1).values, zero)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = ((xmax - xmin) / maxq).clamp(min=_FP16_TINY).half().float()
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """w [N] or [N, C] with scale/zero broadcastable -> integer codes as fp32."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def _damped_inverse_factor(hessian: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1, damping more until it exists."""
    mean_diag = torch.mean(torch.diag(hessian)).item()
    damp = damp_percent
    while damp < 1.0:
        h = hessian.clone()
        h.diagonal().add_(damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            # H^-1 = L^-T L^-1. torch.cholesky_inverse is ~30x slower on the CPU.
            eye = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
            lower_inv = torch.linalg.solve_triangular(lower, eye, upper=False)
            inverse = lower_inv.t() @ lower_inv
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper, damp
        damp += DAMP_INCREMENT
    raise QuantizationError(
        f"the Hessian is not positive definite even with damp_percent {damp:.3f}",
        hint="use more or longer calibration samples, or a larger --damp-percent",
    )


def _processing_order(diag: torch.Tensor, s: GPTQConfig) -> torch.Tensor | None:
    """perm[new_position] = original column, or None for the natural order."""
    num_columns = diag.numel()
    if s.desc_act:
        return torch.argsort(diag, descending=True, stable=True)
    if s.act_group_aware and s.group_size > 0 and not s.static_groups:
        num_groups = num_columns // s.group_size
        grouped = diag[: num_groups * s.group_size].view(num_groups, s.group_size)
        values, local = torch.sort(grouped, dim=1, descending=True, stable=True)
        group_order = torch.argsort(values[:, 0], descending=True, stable=True)
        base = torch.arange(num_groups, device=diag.device).view(-1, 1) * s.group_size
        perm = (local + base)[group_order].reshape(-1)
        tail = torch.arange(num_groups * s.group_size, num_columns, device=diag.device)
        return torch.cat([perm, tail])
    return None


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, settings: GPTQConfig,
                  num_tokens: int = 1) -> GPTQResult:
    """Quantize weight [N, K] against hessian [K, K] (neither is modified)."""
    num_rows, num_columns = weight.shape
    gs = settings.group_size if settings.group_size > 0 else num_columns
    if num_columns % gs:
        raise QuantizationError(f"group_size {gs} does not divide in_features {num_columns}")
    w = weight.detach().to(dtype=torch.float32, device=hessian.device).clone()
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    static = None
    if settings.static_groups:
        static = [fit_grid(w[:, i:i + gs], settings.bits, settings.sym) for i in range(0, num_columns, gs)]
    perm = _processing_order(torch.diag(h), settings)
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    hinv, damp = _damped_inverse_factor(h, settings.damp_percent)
    del h

    codes, group_of_position, grids, losses = _gptq_columns(w, hinv, perm, static, settings, gs)

    scales = torch.stack([g[0] for g in grids]).half()  # [G, N]
    zeros = torch.stack([g[1] for g in grids]).to(torch.int32)
    g_idx = torch.empty(num_columns, dtype=torch.int32, device=w.device)
    codes_out = torch.empty_like(codes)
    if perm is None:
        g_idx[:] = group_of_position
        codes_out = codes
    else:
        g_idx[perm] = group_of_position
        codes_out[:, perm] = codes
    return GPTQResult(codes=codes_out.to(torch.int32), scales=scales, zeros=zeros, g_idx=g_idx,
                      loss=losses / max(num_tokens, 1), damp_percent=damp)


def _gptq_columns(w: torch.Tensor, hinv: torch.Tensor, perm: torch.Tensor | None,
                  static: list | None, s: GPTQConfig, gs: int):
    """The lazy-batch GPTQ loop over columns in processing order (w is updated in place).

    Returns codes [N, K] in processing order, the group of each position, the grid of
    each group (indexed by group id) and the summed loss.
    """
    num_rows, num_columns = w.shape
    codes = torch.zeros_like(w)
    group_of_position = torch.empty(num_columns, dtype=torch.int32, device=w.device)
    num_groups = num_columns // gs
    grids: list = list(static) if static is not None else [None] * num_groups
    natural_groups = s.act_group_aware and not s.desc_act and perm is not None
    loss = torch.zeros((), dtype=torch.float64, device=w.device)
    order = perm.tolist() if perm is not None else None  # host copy: no device sync per column
    scale = zero = None
    for i1 in range(0, num_columns, BLOCK_SIZE):
        i2 = min(i1 + BLOCK_SIZE, num_columns)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            pos = i1 + i
            if static is not None:
                group = order[pos] // gs if order is not None else pos // gs
                scale, zero = grids[group]
            else:
                # Groups are contiguous in processing order; with act_group_aware the
                # group keeps the id of its (contiguous) original columns.
                group = order[pos] // gs if natural_groups else pos // gs
                if pos % gs == 0:
                    scale, zero = fit_grid(w[:, pos:pos + gs], s.bits, s.sym)
                    grids[group] = (scale, zero)
            group_of_position[pos] = group
            col = w1[:, i]
            q = quantize_codes(col, scale, zero, s.maxq)
            codes[:, pos] = q
            delta = col - scale * (q - zero)
            d = hinv1[i, i]
            loss += (delta.square().sum() / (d * d)).double() / 2
            delta = delta / d
            w1[:, i:] -= delta.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = delta
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    return codes, group_of_position, grids, float(loss)


def rtn_quantize(weight: torch.Tensor, settings: GPTQConfig) -> GPTQResult:
    """Round-to-nearest on the same grid, no error feedback: the floor GPTQ must beat."""
    num_rows, num_columns = weight.shape
    gs = settings.group_size if settings.group_size > 0 else num_columns
    if num_columns % gs:
        raise QuantizationError(f"group_size {gs} does not divide in_features {num_columns}")
    w = weight.detach().float()
    grids = [fit_grid(w[:, i:i + gs], settings.bits, settings.sym) for i in range(0, num_columns, gs)]
    scales = torch.stack([g[0] for g in grids])  # [G, N]
    zeros = torch.stack([g[1] for g in grids])
    g_idx = torch.arange(num_columns, device=w.device, dtype=torch.int32) // gs
    g = g_idx.long()
    codes = quantize_codes(w, scales[g].t(), zeros[g].t(), settings.maxq)
    return GPTQResult(codes=codes.to(torch.int32), scales=scales.half(), zeros=zeros.to(torch.int32),
                      g_idx=g_idx, loss=float("nan"), damp_percent=0.0)
