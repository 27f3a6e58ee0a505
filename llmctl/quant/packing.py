"""GPTQ results <-> the tensors of an AutoGPTQ/GPTQModel checkpoint (one linear each).

The bit layout itself lives in `llmctl_kernels/reference.py`; this module decides what is
stored: codes along K, zeros along N, v1 (`gptq`, stores zero-1) or v2
(`gptq_v2`, stores the zero), and splits fused projections back into the
per-projection tensors every loader expects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmctl.errors import QuantizationError
from llmctl.quant.gptq import GPTQResult
from llmctl_kernels.reference import pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros

FORMAT_V1 = "gptq"
FORMAT_V2 = "gptq_v2"


def zero_offset(checkpoint_format: str) -> int:
    """What to add to a stored zero to get the true zero point."""
    if checkpoint_format == FORMAT_V1:
        return 1
    if checkpoint_format == FORMAT_V2:
        return 0
    raise QuantizationError(f"checkpoint_format must be {FORMAT_V1!r} or {FORMAT_V2!r}, got {checkpoint_format!r}")


def format_for(sym: bool) -> str:
    """v1 cannot store a zero point of 0, which asymmetric grids produce."""
    return FORMAT_V1 if sym else FORMAT_V2


@dataclass
class PackedLinear:
    """One linear layer as stored: the tensor suffixes are the checkpoint's."""

    qweight: torch.Tensor  # int32 [K*bits/32, N]
    qzeros: torch.Tensor  # int32 [G, N*bits/32]
    scales: torch.Tensor  # fp16 [G, N]
    g_idx: torch.Tensor  # int32 [K]

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{name}": getattr(self, name).contiguous().cpu()
                for name in ("qweight", "qzeros", "scales", "g_idx")}


def pack_result(result: GPTQResult, bits: int, checkpoint_format: str) -> PackedLinear:
    """Pack codes [N, K], zeros [G, N] and scales [G, N] into the stored tensors."""
    stored_zeros = result.zeros - zero_offset(checkpoint_format)
    if bool((stored_zeros < 0).any()):
        raise QuantizationError(f"format {checkpoint_format!r} cannot store a zero point of 0; use {FORMAT_V2!r}")
    return PackedLinear(
        qweight=pack_qweight(result.codes.t().contiguous(), bits),
        qzeros=pack_qzeros(stored_zeros, bits),
        scales=result.scales.to(torch.float16),
        g_idx=result.g_idx.to(torch.int32),
    )


def unpack_linear(packed: PackedLinear, bits: int, checkpoint_format: str) -> GPTQResult:
    """The inverse of `pack_result` (loss and damping are not stored)."""
    codes = unpack_qweight(packed.qweight, bits).t().contiguous()
    zeros = unpack_qzeros(packed.qzeros, bits) + zero_offset(checkpoint_format)
    return GPTQResult(codes=codes, scales=packed.scales, zeros=zeros, g_idx=packed.g_idx.to(torch.int32),
                      loss=float("nan"), damp_percent=float("nan"))


def split_result(result: GPTQResult, output_sizes: list[int]) -> list[GPTQResult]:
    """A fused projection's result split by output rows (q, k, v or gate, up).

    GPTQ treats output rows independently given H, so each piece is exactly what
    quantizing that projection alone would give; g_idx is shared.
    """
    pieces, start = [], 0
    for size in output_sizes:
        end = start + size
        pieces.append(GPTQResult(
            codes=result.codes[start:end], scales=result.scales[:, start:end], zeros=result.zeros[:, start:end],
            g_idx=result.g_idx, loss=result.loss, damp_percent=result.damp_percent,
        ))
        start = end
    if start != result.codes.shape[0]:
        raise QuantizationError(f"output sizes {output_sizes} do not add up to {result.codes.shape[0]} rows")
    return pieces


def check_packable(name: str, in_features: int, out_features: int, bits: int, group_size: int) -> None:
    """Fail before any work when a linear cannot be stored with these settings."""
    if group_size > 0 and in_features % group_size:
        raise QuantizationError(
            f"group_size {group_size} does not divide in_features {in_features} of {name}",
            hint=f"pick a group size that divides {in_features} (e.g. 64 or 32), or -1 for one group",
        )
    per_word = 32 if bits == 3 else 32 // bits
    if in_features % per_word or out_features % per_word:
        raise QuantizationError(
            f"{name} ({out_features}x{in_features}) cannot be packed at {bits} bits: "
            f"both dims must be multiples of {per_word}"
        )
