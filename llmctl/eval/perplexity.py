"""Perplexity on fixed windows of a token stream (the held-out corpus by default).

Protocol: tokenize the text once (no special tokens), cut the first
`num_windows * window_len` tokens into `num_windows` non-overlapping windows, score
every next-token prediction inside each window (window_len - 1 per window), and
report exp(mean negative log-likelihood). Same windows for every model compared.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from llmctl.errors import ConfigError

# (input_ids [B, S]) -> logits [B, S, V]
LogitsFn = Callable[[torch.Tensor], torch.Tensor]
# (windows done, windows total)
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    num_tokens: int  # predictions scored
    num_windows: int
    window_len: int

    def to_dict(self) -> dict:
        return asdict(self)


def make_windows(token_ids: torch.Tensor, num_windows: int, window_len: int) -> torch.Tensor:
    """token_ids: [T] -> [num_windows, window_len], the leading tokens of the stream."""
    needed = num_windows * window_len
    if token_ids.numel() < needed:
        raise ConfigError(
            f"num_windows x window_len: the text has {token_ids.numel()} tokens, "
            f"{num_windows} x {window_len} = {needed} are needed"
        )
    return token_ids[:needed].reshape(num_windows, window_len)


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one stream of ids [T], without BOS/EOS."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def next_token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [..., L, V] of ids [..., L] -> (log-softmax of the L-1 predictions [..., L-1, V]
    in fp32, NLL of each next token [..., L-1]). The one NLL of llmctl's scoring."""
    logprobs = torch.log_softmax(logits[..., :-1, :].float(), dim=-1)
    target = ids[..., 1:].to(logprobs.device)
    return logprobs, -logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def window_nlls(logits_fn: LogitsFn, windows: torch.Tensor, batch_size: int = 1,
                progress: ProgressFn | None = None) -> torch.Tensor:
    """windows: [W, L] -> summed NLL per window [W] (fp64), L-1 predictions each."""
    sums = torch.zeros(windows.shape[0], dtype=torch.float64)
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size]
        _, nll = next_token_logprobs(logits_fn(batch), batch)  # [B, L-1]
        sums[start:start + batch.shape[0]] = nll.double().sum(dim=1).cpu()
        if progress is not None:
            progress(min(start + batch_size, windows.shape[0]), windows.shape[0])
    return sums


def perplexity(logits_fn: LogitsFn, windows: torch.Tensor, batch_size: int = 1,
               progress: ProgressFn | None = None) -> PerplexityResult:
    sums = window_nlls(logits_fn, windows, batch_size, progress)
    num_tokens = windows.shape[0] * (windows.shape[1] - 1)
    mean = float(sums.sum()) / num_tokens
    return PerplexityResult(perplexity=math.exp(mean), mean_nll=mean, num_tokens=num_tokens,
                            num_windows=windows.shape[0], window_len=windows.shape[1])


def heldout_windows(tokenizer, num_windows: int = 16, window_len: int = 1024,
                    corpus_path: str | None = None) -> torch.Tensor:
    """[num_windows, window_len] from the held-out split of the corpus (blank-line joined)."""
    from llmctl.eval.corpus import load_corpus_split

    text = load_corpus_split(corpus_path).heldout_text()
    return make_windows(tokenize_text(tokenizer, text), num_windows, window_len)
