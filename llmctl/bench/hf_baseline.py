"""The baselines of `llmctl bench throughput`: the same workload through transformers'
`generate`, batched with left padding (`hf`, as `vllm bench throughput --backend hf`
does) or one request at a time (`hf-sequential`)."""

from __future__ import annotations

import time
from typing import Callable

import torch

from llmctl.bench.result import BenchResult


def load_hf_model(model_dir: str | None, dtype: torch.dtype, device: str, arch_config: dict | None = None,
                  seed: int = 0) -> torch.nn.Module:
    """A transformers causal LM from a local dir, or with random weights of `arch_config`'s
    shapes (for `--load-format dummy`: timing does not depend on the weights' values)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch_config is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        return model.to(device).eval()
    config = AutoConfig.for_model(model_type="llama", **{k: v for k, v in arch_config.items()
                                                         if k not in ("architectures", "torch_dtype")})
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _pad_left(prompts: list[list[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate_batch(model: torch.nn.Module, prompts: list[list[int]], output_len: int, n: int = 1,
                   greedy: bool = False, pad_id: int = 0) -> list[list[int]]:
    """New tokens of each (prompt, sample), exactly `output_len` each (EOS is ignored,
    like the engine's ignore_eos), for prompts[i] at rows i*n .. i*n+n-1."""
    device = str(next(model.parameters()).device)
    ids, mask = _pad_left(prompts, pad_id, device)
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=output_len, min_new_tokens=output_len,
        do_sample=not greedy, temperature=None if greedy else 1.0, top_p=None if greedy else 1.0, top_k=None,
        num_return_sequences=n, pad_token_id=pad_id, use_cache=True,
    )
    return out[:, ids.shape[1]:].tolist()


def run_hf(model: torch.nn.Module, prompts: list[list[int]], output_len: int, n: int = 1, batch_size: int = 64,
           backend: str = "hf", on_progress: Callable[[int], None] | None = None) -> BenchResult:
    """Batches of `batch_size` prompts in order (batch_size 1: hf-sequential)."""
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    num_output = 0
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first:first + batch_size]
        num_output += sum(len(o) for o in generate_batch(model, batch, output_len, n))
        if on_progress:
            on_progress(len(batch))
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return BenchResult(backend=backend, num_requests=len(prompts), elapsed_s=elapsed,
                       num_prompt_tokens=sum(len(p) for p in prompts), num_output_tokens=num_output,
                       extra={"batch_size": batch_size})
