"""Statistics over scored tokens: perplexity with its confidence interval, and llama.cpp's
`--kl-divergence` set (KLD, Δp, same top-1, ln PPL ratio, log-prob correlation).

Errors are standard errors of a mean over tokens (sample std / sqrt(N)); tokens of one text
are not independent, so the intervals are narrower than a resampling of documents would give.
"""

from __future__ import annotations

import math

import torch

Z95 = 1.959963984540054
KLD_QUANTILES = (0.999, 0.99, 0.95, 0.90, 0.5, 0.10, 0.05, 0.01)
DP_QUANTILES = (0.999, 0.99, 0.95, 0.90, 0.75, 0.5, 0.25, 0.10, 0.05, 0.01, 0.001)


def mean_stderr(x: torch.Tensor) -> tuple[float, float]:
    """x: [N] -> (mean, std / sqrt(N)) in fp64."""
    x = x.double()
    n = x.numel()
    if n < 2:
        return float(x.mean()) if n else float("nan"), float("nan")
    return float(x.mean()), float(x.std(unbiased=True)) / math.sqrt(n)


def perplexity_stats(logprobs: torch.Tensor) -> dict:
    """logprobs: [N] log-probs of the scored tokens -> ppl and its 95% interval."""
    mean_nll, se = mean_stderr(-logprobs)
    return {"ppl": math.exp(mean_nll), "ppl_ci95": [math.exp(mean_nll - Z95 * se), math.exp(mean_nll + Z95 * se)],
            "mean_nll": mean_nll, "mean_nll_stderr": se, "num_tokens": int(logprobs.numel())}


def _quantiles(x: torch.Tensor, qs: tuple[float, ...], prefix: str) -> dict:
    values = torch.quantile(x.double(), torch.tensor(qs, dtype=torch.float64))
    return {f"{prefix}_p{q * 100:g}": float(v) for q, v in zip(qs, values)}


def kld_stats(kld: torch.Tensor, base_logprob: torch.Tensor, logprob: torch.Tensor,
              same_top1: torch.Tensor) -> dict:
    """Per scored token: kld [N] = KL(base || candidate), the correct token's log-prob under the
    baseline and the candidate [N], and whether both put the same token first [N] bool."""
    n = kld.numel()
    out: dict = {}
    out["kld_mean"], out["kld_stderr"] = mean_stderr(kld)
    out["kld_max"], out["kld_min"] = float(kld.max()), float(kld.min())
    out["kld_median"] = float(torch.quantile(kld.double(), 0.5))
    out.update(_quantiles(kld, KLD_QUANTILES, "kld"))
    dp = logprob.double().exp() - base_logprob.double().exp()  # Δp of the correct token
    out["dp_mean"], out["dp_stderr"] = mean_stderr(dp)
    out["dp_max"], out["dp_min"] = float(dp.max()), float(dp.min())
    out.update(_quantiles(dp, DP_QUANTILES, "dp"))
    sq_mean, sq_se = mean_stderr(dp * dp)
    out["dp_rms"] = math.sqrt(sq_mean)
    out["dp_rms_stderr"] = sq_se / (2 * out["dp_rms"]) if out["dp_rms"] > 0 else 0.0  # delta method
    top1 = float(same_top1.double().mean())
    out["same_top1"], out["same_top1_stderr"] = top1, math.sqrt(top1 * (1 - top1) / n)
    ratio, ratio_se = mean_stderr(base_logprob.double() - logprob.double())  # per token nll_q - nll_base
    out["ln_ppl_ratio"], out["ln_ppl_ratio_stderr"] = ratio, ratio_se
    out["ppl_ratio"] = math.exp(ratio)
    stacked = torch.stack([logprob.double(), base_logprob.double()])
    out["logprob_correlation"] = float(torch.corrcoef(stacked)[0, 1])
    out["num_tokens"] = n
    return out


def accuracy_stats(correct: list[bool]) -> tuple[float, float]:
    """(accuracy, its standard error sqrt(p(1-p)/(n-1))), as lm-eval reports acc_stderr."""
    n = len(correct)
    if n == 0:
        return float("nan"), float("nan")
    p = sum(correct) / n
    return p, math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")
