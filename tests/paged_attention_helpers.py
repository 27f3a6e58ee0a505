"""Random paged batches for the paged-attention kernels' tests and self-check, and the
comparison of the Triton dispatch with the torch path."""

from __future__ import annotations

import itertools
import math

import torch

from llmctl_kernels.paged_attention import paged_attention_reference, paged_attention_triton


def random_paged_batch(
    context_lens: list[int], query_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
    block_size: int, dtype: torch.dtype, device: str | torch.device = "cpu", seed: int = 0,
) -> dict:
    """Keyword arguments for `paged_attention_*`: shuffled block ids, random cache contents
    (sequence b had context_lens[b] tokens cached) and query_lens[b] new tokens."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in zip(context_lens, query_lens)]
    per_seq = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(per_seq) + 2
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots = [], []
    for seq_len, context_len, n in zip(seq_lens, context_lens, per_seq):
        blocks, ids = ids[:n], ids[n:]
        tables.append(blocks + [0] * (max(per_seq) - n))
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(context_len, seq_len)]

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    def ints(values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    num_tokens = sum(query_lens)
    return dict(
        q=rand(num_tokens, num_heads, head_dim), k=rand(num_tokens, num_kv_heads, head_dim),
        v=rand(num_tokens, num_kv_heads, head_dim),
        k_cache=rand(num_blocks, block_size, num_kv_heads, head_dim),
        v_cache=rand(num_blocks, block_size, num_kv_heads, head_dim),
        slot_mapping=ints(slots, torch.int64), block_tables=ints(tables, torch.int32),
        query_start_loc=ints([0, *itertools.accumulate(query_lens)], torch.int32),
        seq_lens=ints(seq_lens, torch.int32), max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        scale=head_dim**-0.5,
    )


def compare_with_reference(batch: dict) -> tuple[float, bool]:
    """Run both paths on copies of one batch -> (max |triton - torch|, caches equal)."""
    ref_batch = dict(batch, k_cache=batch["k_cache"].clone(), v_cache=batch["v_cache"].clone())
    tri_batch = dict(batch, k_cache=batch["k_cache"].clone(), v_cache=batch["v_cache"].clone())
    expected = paged_attention_reference(**ref_batch).float()
    actual = paged_attention_triton(**tri_batch).float()
    same_cache = torch.equal(ref_batch["k_cache"], tri_batch["k_cache"]) and torch.equal(
        ref_batch["v_cache"], tri_batch["v_cache"]
    )
    return (actual - expected).abs().max().item(), same_cache
