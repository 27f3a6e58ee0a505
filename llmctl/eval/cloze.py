"""Cloze on the embedded corpus (LAMBADA style): predict the last word of each held-out summary
from everything before it.

A summary takes part when it ends in a word of at least 3 letters (trailing punctuation is
dropped from the target). Accuracy is lm-eval's LAMBADA `acc`: every token of the word is the
model's greedy choice; perplexity is exp(mean over words of -log p(word | context)).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from llmctl.eval.stats import accuracy_stats

_LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]{3,})[.!?\"')\]]*$", re.DOTALL)


@dataclass(frozen=True)
class ClozeDoc:
    context: str
    target: str  # the last word, with its leading space


def cloze_docs(limit: int | None = None) -> list[ClozeDoc]:
    from llmctl.eval.corpus import load_corpus_split

    docs = []
    for text in load_corpus_split().heldout:
        m = _LAST_WORD.match(text)
        if m:
            docs.append(ClozeDoc(context=m.group(1), target=" " + m.group(2)))
        if limit is not None and len(docs) >= limit:
            break
    return docs


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces of the context move to the continuation; the context is
    encoded alone, the continuation is what the whole string's encoding has past it."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


def cloze_requests(tokenizer, docs: list[ClozeDoc]) -> list[tuple[list[int], list[int]]]:
    return [encode_pair(tokenizer, d.context, d.target) for d in docs]


def cloze_metrics(results: list[tuple[float, bool]]) -> dict:
    acc, stderr = accuracy_stats([greedy for _, greedy in results])
    mean_nll = -sum(lp for lp, _ in results) / len(results)
    return {"cloze_acc": acc, "cloze_acc_stderr": stderr, "cloze_ppl": math.exp(mean_nll),
            "cloze_num_docs": len(results)}
