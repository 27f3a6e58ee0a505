"""Attention for the model: dense causal (no cache) or paged over the engine's KV cache.

The engine sets an `AttentionMetadata` for the duration of one forward pass; every
attention layer reads it. Without one, the input is a dense batch [B, S] and attention
is plain causal attention (used by eval, GPTQ calibration and the tests).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    """One engine step: T new tokens from B sequences, flattened in sequence order.

    Sequence i owns new tokens query_start_loc[i]:query_start_loc[i+1]; before this
    step it already had seq_lens[i] - query_len[i] tokens in the cache (a cached
    prefix or earlier chunks), and its tokens live in the blocks of block_tables[i]:
    token t is in block block_tables[i][t // block_size] at offset t % block_size.
    """

    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset for each new token
    block_tables: torch.Tensor  # [B, max_num_blocks] int32, padded with 0
    query_start_loc: torch.Tensor  # [B + 1] int32, cumulative new-token counts
    seq_lens: torch.Tensor  # [B] int32, tokens in context after this step
    max_query_len: int
    max_seq_len: int
    block_size: int

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


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

    k_cache / v_cache: [num_blocks, block_size, num_kv_heads, head_dim], bound by the
    engine's model runner; empty until then.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [..., H*Dh], k/v: [..., Hkv*Dh] -> [..., H*Dh]
        meta = get_attention_metadata()
        if meta is None:
            return self._dense_causal(q, k, v)
        from llmctl.layers.paged_attention import paged_attention

        shape = q.shape
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
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
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads
        )
        out = out.transpose(1, 2).reshape(bsz, seqlen, self.num_heads * self.head_dim)
        return out[0] if squeeze else out
