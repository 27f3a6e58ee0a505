"""Batched logits transforms of the sampler: penalties, min_tokens, min-p, top-k/top-p, sampling.

Every function works on a whole batch at once with per-row parameter tensors; none
loops over the vocabulary in Python. Semantics follow vLLM (and, for the repetition
penalty, Hugging Face), so the same request behaves the same on either server.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PenaltyTensors:
    """Token histories as flat (row, token id) pairs: no padding to the longest history."""

    prompt_rows: torch.Tensor  # [Np] int64
    prompt_token_ids: torch.Tensor  # [Np] int64
    output_rows: torch.Tensor  # [No] int64
    output_token_ids: torch.Tensor  # [No] int64
    repetition_penalties: torch.Tensor  # [B] fp32, 1.0 = off
    frequency_penalties: torch.Tensor  # [B] fp32, 0.0 = off
    presence_penalties: torch.Tensor  # [B] fp32, 0.0 = off


def apply_penalties(logits: torch.Tensor, penalties: PenaltyTensors) -> torch.Tensor:
    """Repetition penalty over prompt + output (HF/vLLM: divide positive logits, multiply
    negative ones); frequency and presence penalties over output tokens only (OpenAI).

    logits: [B, V] fp32 contiguous, modified in place. Works on the N history entries, not on
    B x V: a [B, V] count tensor per step would cost more than the sampling itself on a CPU.
    """
    vocab_size = logits.shape[1]
    flat = logits.view(-1)
    output_keys = penalties.output_rows * vocab_size + penalties.output_token_ids  # [No] flat positions
    seen = torch.unique(torch.cat([penalties.prompt_rows * vocab_size + penalties.prompt_token_ids, output_keys]))
    rep = penalties.repetition_penalties[seen // vocab_size]
    values = flat[seen]
    flat[seen] = torch.where(values > 0, values / rep, values * rep)
    # Once per occurrence: count * frequency_penalty.
    flat.index_add_(0, output_keys, -penalties.frequency_penalties[penalties.output_rows])
    present = torch.unique(output_keys)
    flat.index_add_(0, present, -penalties.presence_penalties[present // vocab_size])
    return logits


def apply_token_mask(
    logits: torch.Tensor,  # [B, V], modified in place
    rows: torch.Tensor,  # [M] int64
    cols: torch.Tensor,  # [M] int64
) -> torch.Tensor:
    """Forbid (row, token) pairs: min_tokens uses it to hold back EOS and stop tokens."""
    logits[rows, cols] = float("-inf")
    return logits


def apply_logit_bias(
    logits: torch.Tensor,  # [B, V], modified in place
    rows: torch.Tensor,  # [M] int64
    cols: torch.Tensor,  # [M] int64
    values: torch.Tensor,  # [M] fp32
) -> torch.Tensor:
    """OpenAI's logit_bias: add each (row, token)'s bias to its logit."""
    return logits.index_put_((rows, cols), values, accumulate=True)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's top probability.

    logits: [B, V], modified in place; min_p: [B] (0.0 = off).
    """
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill_(probs < threshold, float("-inf"))


def apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int | None = None) -> torch.Tensor:
    """Keep each row's top_k[i] largest logits (ties at the boundary are kept).

    logits: [B, V]; top_k: [B] int64 in [1, V] (V = off); max_top_k: max(top_k) when no row
    is off (saves a device sync).
    """
    return logits.masked_fill_(logits < top_k_threshold(logits, top_k, max_top_k), float("-inf"))


def top_k_threshold(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int | None = None) -> torch.Tensor:
    """[B, 1]: each row's top_k[i]-th largest logit, -inf where top-k is off (top_k = V). Uses
    topk, not a full sort: rows with top-k off must not make every row pay for a top-V."""
    no_top_k = top_k == logits.shape[1]
    k = top_k.masked_fill(no_top_k, 1)
    num = max_top_k if max_top_k is not None else int(k.max())
    kth_values = logits.topk(num, dim=-1).values.gather(1, (k - 1).unsqueeze(1))
    return kth_values.masked_fill_(no_top_k.unsqueeze(1), float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor, max_top_k: int | None = None) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches p (a token stays while
    the mass strictly above it is below p), and every token tied with the least likely kept.

    logits: [B, V], modified in place; top_p: [B] (1.0 = off: the row keeps every token);
    max_top_k: every row already kept at most this many tokens (top-k), so a topk replaces the
    sort of V.

    The cut is a probability threshold from the row's own softmax and cumulative sum, so a
    row's result does not depend on which other rows share the batch, nor on how ties are
    ordered: seeded requests stay reproducible.
    """
    probs = torch.softmax(logits, dim=-1)
    if max_top_k is not None and max_top_k * 8 <= logits.shape[1]:
        probs_desc = probs.topk(max_top_k, dim=-1).values
    else:
        probs_desc = probs.sort(dim=-1, descending=True).values
    mass_above = probs_desc.cumsum(dim=-1)[:, :-1]  # [B, K-1], non-decreasing
    num_kept = 1 + (mass_above < top_p.unsqueeze(1)).sum(dim=-1)
    threshold = probs_desc.gather(1, (num_kept - 1).unsqueeze(1))
    # a row with top_p = 1 beside rows that use it keeps every token (its rounded cumulative sum
    # may reach 1 before the least likely ones)
    threshold.masked_fill_(top_p.unsqueeze(1) >= 1.0, 0.0)
    return logits.masked_fill_(probs < threshold, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor,  # [B, V], modified in place
    top_k: torch.Tensor | None,  # [B] int64 in [1, V], V = off
    top_p: torch.Tensor | None,  # [B] fp32 in (0, 1], 1.0 = off
    max_top_k: int | None = None,  # max(top_k) when every row has top-k on
) -> torch.Tensor:
    """Top-k, then top-p on what top-k left (the order vLLM and HF use)."""
    if top_k is not None:
        apply_top_k_only(logits, top_k, max_top_k)
    if top_p is not None:
        apply_top_p(logits, top_p, max_top_k if top_k is not None else None)
    return logits


def random_sample(
    probs: torch.Tensor,  # [B, V] fp32
    generators: dict[int, torch.Generator],
) -> torch.Tensor:
    """Exponential race: argmax(p / q) with q ~ Exp(1) is a draw from p.

    Row i with a generator draws its V exponentials from that generator only, so its
    result depends on its own seed and history, never on its neighbours. The other rows
    share one batched draw from the global generator. Returns [B] int64.
    """
    # q = -log(U), U ~ Uniform[0, 1): the same Exp(1) draw as Tensor.exponential_, which on
    # the CPU runs ~8x slower than torch.rand (it was ~12% of a decode step there).
    q = torch.empty_like(probs)
    if len(generators) != probs.shape[0]:
        torch.rand(q.shape, out=q)
    for row, generator in generators.items():
        torch.rand(q.shape[1:], generator=generator, out=q[row])
    q.log_().neg_()
    # U near 1 gives q = 0; p / 0 would be inf (or nan for p = 0) and win the race.
    q.clamp_min_(torch.finfo(q.dtype).tiny)
    return probs.div_(q).argmax(dim=-1)
