"""The check `llmctl quantize` runs on its own output: original vs quantized on held-out text.

Both models score the same windows of the held-out corpus split; besides each
perplexity it reports the mean KL divergence KL(original || quantized) per token
and how often their top-1 next-token predictions agree.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from llmctl.config import EvalConfig
from llmctl.eval.perplexity import next_token_logprobs


@torch.no_grad()
def compare_logits(logits_fn_a, logits_fn_b, windows: torch.Tensor,
                   on_window: Callable[[int, int], None] | None = None) -> dict:
    """windows: [W, L]. Model a is the reference. Returns perplexities, KL and top-1 agreement."""
    nll_a = nll_b = kl = agree = 0.0
    count = 0
    for i, window in enumerate(windows):
        ids = window.unsqueeze(0)
        la, na = next_token_logprobs(logits_fn_a(ids)[0], window)  # [L-1, V], [L-1]
        lb, nb = next_token_logprobs(logits_fn_b(ids)[0], window)
        nll_a += na.double().sum().item()
        nll_b += nb.double().sum().item()
        kl += (la.exp() * (la - lb)).sum(-1).double().sum().item()
        agree += (la.argmax(-1) == lb.argmax(-1)).sum().item()
        count += la.shape[0]
        if on_window is not None:
            on_window(i + 1, windows.shape[0])
    return {
        "ppl_original": math.exp(nll_a / count), "ppl_quantized": math.exp(nll_b / count),
        "kl_divergence": kl / count, "top1_agreement": agree / count,
        "num_windows": int(windows.shape[0]), "window_len": int(windows.shape[1]), "num_tokens": count,
    }


def quick_eval(original_dir: Path, quantized_dir: Path, tokenizer, eval_config: EvalConfig,
               device: str = "cpu", on_stage=None) -> dict:
    """Load both models (fp32 on the CPU, fp16 on CUDA), compare them on held-out windows and
    apply the eval gate (relative perplexity increase, top-1 agreement)."""
    from llmctl.eval.perplexity import heldout_windows
    from llmctl.models.loader import load_model

    dtype = torch.float32 if torch.device(device).type == "cpu" else torch.float16
    windows = heldout_windows(tokenizer, eval_config.num_windows, eval_config.window_len)
    original = load_model(original_dir, dtype=dtype, device=device)
    quantized = load_model(quantized_dir, dtype=dtype, device=device)
    stage = on_stage or (lambda *_: None)
    result = compare_logits(lambda x: original.logits(x.to(device)), lambda x: quantized.logits(x.to(device)),
                            windows, on_window=lambda d, t: stage("eval", d, t))
    result["protocol"] = "held-out corpus split joined by blank lines, non-overlapping windows, fp32" \
        if dtype == torch.float32 else "held-out corpus split, non-overlapping windows, fp16"
    result["ppl_increase"] = result["ppl_quantized"] / result["ppl_original"] - 1.0
    result["max_ppl_increase"] = eval_config.max_ppl_increase
    result["min_top1_agreement"] = eval_config.min_top1_agreement
    result["passed"] = (result["ppl_increase"] <= eval_config.max_ppl_increase
                        and result["top1_agreement"] >= eval_config.min_top1_agreement)
    return result
