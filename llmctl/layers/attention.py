"""Attention for the model: dense causal (no cache) or paged over the engine's KV cache.

The engine sets an `AttentionMetadata` for the duration of one forward pass; every
attention layer reads it. Without one, the input is a dense batch [B, S] and attention
is plain causal attention (used by eval, GPTQ calibration and the tests).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.layers.paged_attention import AttentionMetadata, paged_attention

_METADATA: AttentionMetadata | None = None


@contextlib.contextmanager
def attention_metadata(meta: AttentionMetadata | None) -> Iterator[None]:
    """Make `meta` visible to every attention layer during one forward pass."""
    global _METADATA
    prev, _METADATA = _METADATA, meta
    try:
        yield
    finally:
        _METADATA = prev


def get_attention_metadata() -> AttentionMetadata | None:
    return _METADATA


class Attention(nn.Module):
    """Scaled dot-product attention with grouped-query heads.

    sliding_window: the number of positions a token attends to, itself included (Mistral:
    key j is visible to query i when i - window < j <= i); None for full causal attention.
    k_cache / v_cache: [num_blocks, block_size, num_kv_heads, head_dim], bound by the
    engine's model runner; empty until then.
    """

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, sliding_window: int | None = None
    ) -> None:
        super().__init__()
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive number of tokens, got {sliding_window}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [..., H*Dh], k/v: [..., Hkv*Dh] -> [..., H*Dh]
        meta = get_attention_metadata()
        if meta is None:
            return self._dense_causal(q, k, v)
        shape = q.shape
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k, v, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window)
        return out.reshape(shape)

    def _dense_causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [B, S, H*Dh] (a bare [S, ...] is one sequence)
        squeeze = q.dim() == 2
        if squeeze:
            q, k, v = q[None], k[None], v[None]
        bsz, seqlen, _ = q.shape
        q = q.view(bsz, seqlen, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(bsz, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(bsz, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        mask = None
        if self.sliding_window is not None and seqlen > self.sliding_window:
            pos = torch.arange(seqlen, device=q.device)
            offset = pos[:, None] - pos[None, :]  # query - key: [S, S]
            mask = (offset >= 0) & (offset < self.sliding_window)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        out = out.transpose(1, 2).reshape(bsz, seqlen, self.num_heads * self.head_dim)
        return out[0] if squeeze else out
