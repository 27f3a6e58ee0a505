"""Paged attention for one engine step: write the new K/V at their slots, then attend
through the block tables. Triton kernels on CUDA, the pure-torch path elsewhere."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmctl.errors import LlmctlError
from llmctl.layers import use_triton
from llmctl_kernels.paged_attention import paged_attention_reference


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


class AttentionShapeError(LlmctlError, ValueError):
    """Tensors handed to paged attention disagree with each other or with the metadata."""


def _check(name: str, ok: bool, problem: str) -> None:
    if not ok:
        raise AttentionShapeError(f"paged attention: {name} {problem}")


def check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
) -> None:
    """Host-side checks only (shapes, dtypes): nothing here waits on the device."""
    _check("q", q.dim() == 3, f"must be [T, H, Dh], got {tuple(q.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    _check("k", k.dim() == 3 and k.shape[0] == num_tokens and k.shape[2] == head_dim,
           f"must be [T={num_tokens}, Hkv, Dh={head_dim}], got {tuple(k.shape)}")
    _check("v", v.shape == k.shape, f"must match k {tuple(k.shape)}, got {tuple(v.shape)}")
    num_kv_heads = k.shape[1]
    _check("q", num_heads % num_kv_heads == 0, f"heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    expected = (meta.block_size, num_kv_heads, head_dim)
    _check("k_cache", k_cache.dim() == 4 and tuple(k_cache.shape[1:]) == expected,
           f"must be [num_blocks, {', '.join(map(str, expected))}], got {tuple(k_cache.shape)} "
           "(is the KV cache bound to this layer?)")
    _check("v_cache", v_cache.shape == k_cache.shape and v_cache.dtype == k_cache.dtype,
           f"must match k_cache {tuple(k_cache.shape)} {k_cache.dtype}, got {tuple(v_cache.shape)} {v_cache.dtype}")
    _check("k_cache", k_cache.is_contiguous() and v_cache.is_contiguous(), "and v_cache must be contiguous")
    _check("slot_mapping", tuple(meta.slot_mapping.shape) == (num_tokens,),
           f"must be [T={num_tokens}], got {tuple(meta.slot_mapping.shape)}")
    num_seqs = meta.num_seqs
    _check("query_start_loc", tuple(meta.query_start_loc.shape) == (num_seqs + 1,),
           f"must be [B+1={num_seqs + 1}], got {tuple(meta.query_start_loc.shape)}")
    _check("block_tables", meta.block_tables.dim() == 2 and meta.block_tables.shape[0] == num_seqs,
           f"must be [B={num_seqs}, max_blocks], got {tuple(meta.block_tables.shape)}")
    _check("block_tables", meta.block_tables.shape[1] * meta.block_size >= meta.max_seq_len,
           f"has {meta.block_tables.shape[1]} columns of {meta.block_size} tokens, "
           f"too few for max_seq_len {meta.max_seq_len}")


def paged_attention(
    q: torch.Tensor,  # [T, H, Dh]
    k: torch.Tensor,  # [T, Hkv, Dh]
    v: torch.Tensor,  # [T, Hkv, Dh]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Write this step's k/v into the cache at meta.slot_mapping, then return [T, H, Dh]:
    each new token attends causally to its sequence's cached context and itself (the
    last `sliding_window` positions of it, itself included, when set)."""
    check_inputs(q, k, v, k_cache, v_cache, meta)
    args = (
        q, k, v, k_cache, v_cache, meta.slot_mapping, meta.block_tables,
        meta.query_start_loc, meta.seq_lens, meta.max_query_len, meta.max_seq_len, scale, sliding_window,
    )
    if use_triton(q):
        from llmctl_kernels.paged_attention import paged_attention_triton

        return paged_attention_triton(*args)
    return paged_attention_reference(*args)
