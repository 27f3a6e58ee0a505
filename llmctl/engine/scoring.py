"""Prompt scoring: a request may carry a `PromptScorer`, a function the model runner calls on
the full-vocabulary log-probabilities of the prompt tokens as each step computes them.

Eval needs more than top-k dicts (KL divergence reads whole rows) but can never hold
[num_tokens, V] at once (a 128k vocabulary is 512 KiB a token in fp32), so the rows are
handed over in chunks of at most `SCORE_ROWS` and the scorer reduces each chunk to what it
keeps (a target log-prob, an argmax, a top-K), on the device, before the next chunk exists.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

SCORE_ROWS = 512  # rows per log-softmax: bounds the fp32 [rows, V] peak of scoring

# (logprobs [R, V] fp32, target token ids [R] long, first target position) -> what to keep of
# the chunk: a dict of tensors whose first dimension is R (concatenated over chunks).
PromptScorer = Callable[[torch.Tensor, torch.Tensor, int], dict[str, torch.Tensor]]


def target_logprobs(logprobs: torch.Tensor, targets: torch.Tensor, first: int) -> dict[str, torch.Tensor]:
    """The default scorer: each target's log-prob and whether it is the argmax (lm-eval's
    `loglikelihood` pair, summed over a continuation by the caller)."""
    # logprobs: [R, V], targets: [R]
    return {"logprob": logprobs.gather(-1, targets[:, None])[:, 0],
            "greedy": logprobs.argmax(-1) == targets}


def score_rows(model, hidden: torch.Tensor, prompt_token_ids: Sequence[int], first: int,
               scorer: PromptScorer) -> list[dict[str, Any]]:
    """hidden: [R, D], the rows predicting prompt tokens first..first+R-1. One scorer call per
    chunk of SCORE_ROWS rows."""
    results = []
    for a in range(0, hidden.shape[0], SCORE_ROWS):
        b = min(a + SCORE_ROWS, hidden.shape[0])
        logprobs = torch.log_softmax(model.compute_logits(hidden[a:b]).float(), dim=-1)  # [b - a, V]
        targets = torch.tensor(prompt_token_ids[first + a:first + b], dtype=torch.long, device=hidden.device)
        results.append(scorer(logprobs, targets, first + a))
    return results


def concat_scores(chunks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A request's chunk results joined along the position dimension, on the CPU."""
    if not chunks:
        return {}
    return {key: torch.cat([c[key] for c in chunks]).cpu() for key in chunks[0]}


def add_scores(spans, first: int, logits: torch.Tensor, result: dict[int, tuple[list, int]]) -> None:
    """Run each span's scorer on its rows inside logits_rows[first:first + len(logits)]
    (llmctl.engine.step_batch.ScoreSpan). result: seq_id -> (chunk results, next token to score)."""
    last = first + logits.shape[0]
    for span in spans:
        lo, hi = max(first, span.first_row), min(last, span.first_row + span.num_rows)
        if lo >= hi:
            continue
        start = span.lo + lo - span.first_row  # the first target token of these rows
        logprobs = torch.log_softmax(logits[lo - first:hi - first].float(), dim=-1)  # [hi - lo, V]
        targets = torch.tensor(span.prompt_token_ids[start:start + hi - lo], dtype=torch.long, device=logits.device)
        chunks, _ = result.get(span.seq_id, ([], 0))
        chunks.append(span.scorer(logprobs, targets, start))
        result[span.seq_id] = (chunks, start + hi - lo)


@torch.inference_mode()
def score_dense(model, device: torch.device, prompt_token_ids: Sequence[int], first: int, end: int,
                scorer: PromptScorer) -> list:
    """The scorer on prompt tokens first..end-1 by a dense forward of positions 0..end-2 (no
    cache): for a prefix the cache served, whose hidden states no paged step computed."""
    ids = torch.tensor([list(prompt_token_ids[:end - 1])], device=device)
    positions = torch.arange(end - 1, device=device)[None]
    hidden = model(ids, positions)[0]  # [end - 1, D]
    return score_rows(model, hidden[first - 1:], prompt_token_ids, first, scorer)
