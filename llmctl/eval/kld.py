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

K = 0 keeps whole rows, each log-prob as a 16-bit code (the idea of llama.cpp's KLD base file):
the row's distance below its maximum, clamped at ROW_RANGE nats and rounded to 65,536 steps
of ROW_STEP. 2 bytes per vocabulary entry (a quarter of K = V's sorted fp32 log-probs and int32
ids, half of fp32 rows, no sort), which halves what crosses between device and host, and
the KLD it gives is within ROW_ERR x (1 + sum_v p_v |log p_v - log q_v|) nats of the exact
value per token: each log p is off by at most ROW_ERR (half a step, and the fp32 rounding of
the distance), and the probabilities below
e^-ROW_RANGE (1.3e-14) of the row's largest are raised to that floor, which adds at most
1.3e-14 x V x max|log q|, about 1e-7 nats at a 128k vocabulary. The correct token's log-prob
and the argmax are kept exact beside the codes, so perplexity, Δp and same-top-1 are exact.
"""

from __future__ import annotations

import torch

_TAIL_FLOOR = 1e-7
ROW_RANGE = 32.0  # nats below a row's largest log-prob that its 16-bit codes cover
ROW_STEP = ROW_RANGE / 65535  # 4.9e-4 nats per code
ROW_ERR = ROW_STEP / 2 + 4e-6  # the most a coded log-prob is off: half a step, fp32 rounding


def pack_rows(logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logprobs [R, V] fp32 -> (codes [R, V] int16, row_max [R] fp32); see unpack_rows."""
    row_max = logprobs.amax(-1)
    steps = ((row_max[:, None] - logprobs).clamp_(max=ROW_RANGE) / ROW_STEP).round_()
    return (steps - 32768).to(torch.int16), row_max


def unpack_rows(codes: torch.Tensor, row_max: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """The log-probs pack_rows coded, each within ROW_ERR (or floored at ROW_RANGE below
    the row's largest)."""
    return row_max.to(dtype)[:, None] - (codes.to(dtype) + 32768) * ROW_STEP


def baseline_bytes_per_token(top_k: int, vocab_size: int) -> int:
    """What the baseline keeps per scored token (baseline_scorer): the target's fp32 log-prob,
    and K fp32 log-probs with their int32 ids, or (K = 0) V 16-bit codes, the row's fp32
    maximum and its int32 argmax."""
    if top_k == 0:
        return 4 + 2 * vocab_size + 4 + 4
    return 4 + 8 * min(top_k, vocab_size)


def baseline_scorer(top_k: int):
    """Scorer for the baseline run: what the cache stores per scored token."""

    def score(logprobs: torch.Tensor, targets: torch.Tensor, first: int) -> dict[str, torch.Tensor]:
        # logprobs: [R, V] fp32, targets: [R]
        logprob = logprobs.gather(-1, targets[:, None])[:, 0]
        if top_k == 0:
            codes, row_max = pack_rows(logprobs)
            return {"logprob": logprob, "rows": codes, "row_max": row_max,
                    "argmax": logprobs.argmax(-1).to(torch.int32)}
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


def kld_whole_rows(codes: torch.Tensor, row_max: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """codes [R, V], row_max [R] (pack_rows of the baseline), logprobs [R, V] the candidate's
    -> KL(base || candidate) per row [R] (fp64), within the bound of the module's docstring."""
    out = torch.empty(codes.shape[0], dtype=torch.float64, device=logprobs.device)
    # fp64 [rows, V] temporaries, 64 rows at a time: 66 MB each at a 128k vocabulary, not 0.5 GB
    for a in range(0, codes.shape[0], 64):
        p_lp = unpack_rows(codes[a:a + 64], row_max[a:a + 64])
        out[a:a + 64] = (p_lp.exp() * (p_lp - logprobs[a:a + 64].double())).sum(-1)
    return out.clamp_min_(0.0)


def candidate_scorer(base: dict[str, torch.Tensor] | None, score_from: int, device: torch.device):
    """Scorer for a candidate: its correct-token log-prob and argmax, and with the baseline's
    rows of this window (`base`, indexed from `score_from`), the KLD and same-top-1 per token.
    Top-K rows (2 KiB a token) go to the device with the scorer; whole rows stay where they are
    and cross one chunk at a time, so the device holds a chunk of them, never a window's."""
    whole = base is not None and "rows" in base
    if base is not None and not whole:
        base = {k: v.to(device) for k, v in base.items()}

    def score(logprobs: torch.Tensor, targets: torch.Tensor, first: int) -> dict[str, torch.Tensor]:
        out = {"logprob": logprobs.gather(-1, targets[:, None])[:, 0], "argmax": logprobs.argmax(-1)}
        if base is not None:
            lo, hi = first - score_from, first - score_from + logprobs.shape[0]
            if whole:
                codes, row_max, argmax = (base[k][lo:hi].to(device) for k in ("rows", "row_max", "argmax"))
                out["kld"] = kld_whole_rows(codes, row_max, logprobs)
                out["same_top1"] = out["argmax"] == argmax.long()
            else:
                top_lp, top_id = base["top_lp"][lo:hi], base["top_id"][lo:hi]
                out["kld"] = kld_rows(top_lp, top_id, logprobs)
                out["same_top1"] = out["argmax"] == top_id[:, 0].long()
        return out

    return score
