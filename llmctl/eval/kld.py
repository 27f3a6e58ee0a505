"""KL divergence against a baseline, one chunk of full-vocabulary rows at a time.

The baseline keeps, per scored token, its top-K log-probs and their token ids plus the
correct token's log-prob; the rest of its distribution is one "tail" bucket of mass
1 - sum(top-K). The candidate is compared on the same K tokens plus its own mass on the
complement of them:

    KLD = sum_k p_k (log p_k - log q_k) + p_tail (log p_tail - log q_tail)

With K = the vocabulary size this is the exact KL(base || candidate). With K < V it is the
KL between the two distributions coarsened to K + 1 buckets, which by the log-sum inequality
never exceeds the exact value and differs from it only inside the tail (docs/benchmarks.md
has the measured gap on the default model: 5.7% low on the mean at K = 256).

K = 0 keeps whole rows instead (in vocabulary order, with their argmax): the exact KL at
4 bytes per vocabulary entry, half of what K = V's sorted log-probs and ids take, and no sort.
"""

from __future__ import annotations

import torch

_TAIL_FLOOR = 1e-7


def baseline_scorer(top_k: int):
    """Scorer for the baseline run: what the cache stores per scored token."""

    def score(logprobs: torch.Tensor, targets: torch.Tensor, first: int) -> dict[str, torch.Tensor]:
        # logprobs: [R, V] fp32, targets: [R]
        logprob = logprobs.gather(-1, targets[:, None])[:, 0]
        if top_k == 0:
            return {"logprob": logprob, "rows": logprobs, "argmax": logprobs.argmax(-1).to(torch.int32)}
        k = min(top_k, logprobs.shape[-1])
        top_lp, top_id = logprobs.topk(k, dim=-1)  # [R, K], sorted: column 0 is the argmax
        return {"logprob": logprob, "top_lp": top_lp, "top_id": top_id.to(torch.int32)}

    return score


def kld_rows(base_top_lp: torch.Tensor, base_top_id: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """base_top_lp, base_top_id: [R, K]; logprobs: [R, V] the candidate's -> KLD per row [R] (fp64)."""
    p_lp = base_top_lp.double()
    q_lp = logprobs.gather(-1, base_top_id.long()).double()  # [R, K]
    p = p_lp.exp()
    head = (p * (p_lp - q_lp)).sum(-1)
    if base_top_id.shape[-1] == logprobs.shape[-1]:  # whole rows: there is no tail
        return head.clamp_min(0.0)
    # Tail masses come from 1 - sum(fp32 probabilities): below _TAIL_FLOOR they are rounding.
    p_tail = (1.0 - p.sum(-1)).clamp_min(_TAIL_FLOOR)
    q_tail = (1.0 - q_lp.exp().sum(-1)).clamp_min(_TAIL_FLOOR)
    return (head + p_tail * (p_tail.log() - q_tail.log())).clamp_min(0.0)


def kld_whole_rows(base_rows: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """base_rows, logprobs: [R, V] -> the exact KL(base || candidate) per row [R] (fp64)."""
    p_lp = base_rows.double()
    return (p_lp.exp() * (p_lp - logprobs.double())).sum(-1).clamp_min(0.0)


def candidate_scorer(base: dict[str, torch.Tensor] | None, score_from: int, device: torch.device):
    """Scorer for a candidate: its correct-token log-prob and argmax, and with the baseline's
    rows of this window (`base`, indexed from `score_from`), the KLD and same-top-1 per token."""
    if base is not None:
        base = {k: v.to(device) for k, v in base.items()}

    def score(logprobs: torch.Tensor, targets: torch.Tensor, first: int) -> dict[str, torch.Tensor]:
        out = {"logprob": logprobs.gather(-1, targets[:, None])[:, 0], "argmax": logprobs.argmax(-1)}
        if base is not None:
            lo, hi = first - score_from, first - score_from + logprobs.shape[0]
            if "rows" in base:  # whole rows (top_k 0)
                out["kld"] = kld_whole_rows(base["rows"][lo:hi], logprobs)
                out["same_top1"] = out["argmax"] == base["argmax"][lo:hi].long()
            else:
                top_lp, top_id = base["top_lp"][lo:hi], base["top_id"][lo:hi]
                out["kld"] = kld_rows(top_lp, top_id, logprobs)
                out["same_top1"] = out["argmax"] == top_id[:, 0].long()
        return out

    return score
