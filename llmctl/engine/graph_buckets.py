"""The CUDA graphs' bucket sizes (torch-free: `llmctl plan` counts the graphs' memory from them).

Decode graphs (llmctl.engine.cuda_graph): one per batch-size bucket up to max_num_seqs. Prefill
graphs (llmctl.engine.prefill_graph): one per (token bucket, sequence bucket) up to a step's
budget and max_prefill_graph_tokens.
"""

from __future__ import annotations

from typing import Sequence

BUCKETS = (1, 2, 4, 8, *range(16, 257, 16))
# Powers of two up to 512, then steps of 256 (a 1,025-token step pads by 25%, not 100%).
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, *range(768, 8193, 256))
SEQ_BUCKETS = (1, 2, 4, 8)
DEFAULT_MAX_GRAPH_TOKENS = 2048


def _up_to_holding(buckets: Sequence[int], n: int) -> list[int]:
    """The buckets (ascending) up to and including the first that holds n (all when none does)."""
    holding = smallest_holding(buckets, n)
    return [b for b in buckets if holding is None or b <= holding]


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Decode buckets up to the first one that holds max_num_seqs (at most 256)."""
    return _up_to_holding(BUCKETS, max_num_seqs)


def prefill_capture_sizes(max_num_tokens: int, max_num_seqs: int,
                          max_graph_tokens: int = DEFAULT_MAX_GRAPH_TOKENS) -> tuple[list[int], list[int]]:
    """(token buckets, sequence buckets) for a step budget of max_num_tokens tokens and
    max_num_seqs sequences: the token buckets up to min(budget, max_graph_tokens) and that
    limit itself, the sequence buckets up to the first that holds max_num_seqs. A limit of 0
    captures nothing (no token bucket)."""
    limit = min(max_num_tokens, max_graph_tokens)
    if limit <= 0:
        return [], []
    tokens = [t for t in TOKEN_BUCKETS if t < limit]
    tokens.append(limit)  # a step's whole budget, or the largest step that replays
    return tokens, _up_to_holding(SEQ_BUCKETS, max_num_seqs)


def smallest_holding(sizes: Sequence[int], n: int) -> int | None:
    """The bucket a step of n replays: the smallest of `sizes` (ascending) that holds n; None
    when n exceeds them all (the step runs eagerly)."""
    return next((s for s in sizes if s >= n), None)
