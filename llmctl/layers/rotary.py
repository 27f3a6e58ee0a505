"""Rotary position embeddings (NeoX half-rotation, as HF Llama), with Llama-3.1 and linear scaling.

cos/sin are tabulated once for every position up to the model's context length, so
a step of the engine only gathers rows by position, whatever order tokens come in.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from llmctl.errors import ModelLoadError
from llmctl.layers import use_triton


def _default_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    # Same arithmetic as transformers, so the tables agree bit for bit.
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float32) / rotary_dim
    return 1.0 / (base ** exponents)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context_len = int(scaling.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def compute_inv_freq(rotary_dim: int, base: float, rope_scaling: dict[str, Any] | None) -> torch.Tensor:
    """[rotary_dim / 2] float32 inverse frequencies for a config's rope settings."""
    inv_freq = _default_inv_freq(rotary_dim, base)
    rope_type = (rope_scaling or {}).get("rope_type") or (rope_scaling or {}).get("type") or "default"
    if rope_type == "default":
        return inv_freq
    try:
        if rope_type == "llama3":
            return _llama3_inv_freq(inv_freq, rope_scaling)
        if rope_type == "linear":
            return inv_freq / float(rope_scaling["factor"])
    except KeyError as err:
        raise ModelLoadError(f"rope_scaling ({rope_type}): missing field {err}") from err
    raise ModelLoadError(
        f"rope_scaling type {rope_type!r} is not supported",
        hint="supported: default, llama3, linear (dynamic NTK rescales with the sequence length, which a KV cache cannot follow)",
    )


def _rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [..., H, D], cos/sin: [..., 1, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class RotaryEmbedding(nn.Module):
    """Applies rotary embeddings to q and k by absolute position."""

    def __init__(self, head_dim: int, max_position: int, base: float, rope_scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        inv_freq = compute_inv_freq(head_dim, base, rope_scaling)
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        # cos_sin_cache: [max_position, 2, head_dim], float32; cast to the activations' dtype on use as HF does.
        self.register_buffer("cos_sin_cache", torch.stack((emb.cos(), emb.sin()), dim=1), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [...] int64, q: [..., H*D], k: [..., Hkv*D] (same leading dims)
        if use_triton(q) and q.dim() == 2 and q.stride(-1) == 1 and k.stride(-1) == 1:
            from llmctl_kernels.fused_ops import rotary_embedding

            # In place: q and k are views of this layer's fresh qkv output.
            rotary_embedding(positions, q, k, self.cos_sin_cache, self.head_dim)
            return q, k
        return self.forward_native(positions, q, k)

    def forward_native(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos_sin = self.cos_sin_cache[positions].to(q.dtype)
        cos, sin = cos_sin[..., 0:1, :], cos_sin[..., 1:2, :]
        q_rot = _rotate_neox(q.unflatten(-1, (-1, self.head_dim)), cos, sin)
        k_rot = _rotate_neox(k.unflatten(-1, (-1, self.head_dim)), cos, sin)
        return q_rot.flatten(-2), k_rot.flatten(-2)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_position={self.max_position}"
