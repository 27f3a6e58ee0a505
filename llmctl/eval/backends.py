"""Where eval's forwards run: llmctl's engine in this process (`EngineBackend`, through
`LLM.score`), or any OpenAI-compatible server (`ServerBackend`, /v1/completions with echo
and logprobs). Both answer the same two questions: per-token scores of windows, and
lm-eval's loglikelihood of a continuation after a context."""

from __future__ import annotations

from typing import Callable

import torch

from llmctl.eval.kld import baseline_scorer, candidate_scorer
from llmctl.eval.windows import Windows

# told of each k newly scored windows or requests (for a progress bar)
Progress = Callable[[int], None]
# (context ids, continuation ids)
LoglikelihoodRequest = tuple[list[int], list[int]]


def _concat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}


def truncate_left(context: list[int], continuation: list[int], max_len: int) -> list[int]:
    """The context's tail that fits with the continuation in max_len tokens (lm-eval's rule)."""
    room = max_len - len(continuation)
    return context[-room:] if room > 0 else context[-1:]


class EngineBackend:
    """Scores through `LLM.score`: the engine's batched, paged forward and its kernels."""

    kind = "engine"

    def __init__(self, llm) -> None:
        self.llm = llm
        self.tokenizer = llm.tokenizer
        # one slot stays free for the token the request generates
        self.max_len = llm.engine.max_model_len - 1

    @property
    def device(self) -> torch.device:
        return self.llm.engine.device

    def describe(self) -> dict:
        engine = self.llm.engine
        return {"backend": "engine", "model": engine.model_name, "model_dir": str(engine.model_dir),
                "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
                "vocab_size": engine.arch.vocab_size}

    def _score(self, windows: Windows, scorers: list, progress: Progress | None) -> list[dict[str, torch.Tensor]]:
        count = windows.ids.shape[0]
        tick = progress or (lambda k: None)
        parts = []
        # One window's scorer differs from the next's (it reads that window's baseline rows), so
        # windows go in as separate requests; the engine batches them all the same.
        prompts = [w.tolist() for w in windows.ids]
        for start in range(0, count, 64):
            stop = min(start + 64, count)
            for i, prompt in enumerate(prompts[start:stop], start):
                self.llm.engine.add_request(f"eval-w{i}", prompt, self._params(), scorer=scorers[i],
                                            score_from=windows.score_from[i])
            parts += self._drain([f"eval-w{i}" for i in range(start, stop)], tick)
        return parts

    @staticmethod
    def _params():
        from llmctl.sampling_params import RequestOutputKind, SamplingParams

        return SamplingParams(temperature=0.0, max_tokens=1, output_kind=RequestOutputKind.FINAL_ONLY)

    def _drain(self, ids: list[str], tick) -> list[dict[str, torch.Tensor]]:
        from llmctl.engine.scoring import concat_scores

        engine, finished = self.llm.engine, {}
        try:
            while engine.has_unfinished_requests():
                done = [o for o in engine.step() if o.finished]
                for out in done:
                    finished[out.request_id] = concat_scores(out.prompt_scores or [])
                if done:
                    tick(len(done))
        except BaseException:
            engine.abort_request(ids)  # the finished ones are skipped
            raise
        return [finished[rid] for rid in ids]

    def baseline_rows(self, windows: Windows, top_k: int, progress: Progress | None = None) -> dict:
        """Per scored token, concatenated over windows: logprob [N], top_lp [N, K], top_id [N, K]
        (top_k 0: logprob [N], rows [N, V], argmax [N])."""
        scorer = baseline_scorer(top_k)
        return _concat(self._score(windows, [scorer] * windows.ids.shape[0], progress))

    def window_scores(self, windows: Windows, base: dict | None, progress: Progress | None = None) -> dict:
        """Per scored token: logprob, argmax, and against `base` (baseline_rows) kld and same_top1."""
        offsets = window_offsets(windows)
        scorers = []
        for i, first in enumerate(windows.score_from):
            rows = None if base is None else {k: v[offsets[i]:offsets[i + 1]] for k, v in base.items() if k != "logprob"}
            scorers.append(candidate_scorer(rows, first, self.device))
        return _concat(self._score(windows, scorers, progress))

    def loglikelihood(self, requests: list[LoglikelihoodRequest], progress: Progress | None = None
                      ) -> list[tuple[float, bool]]:
        """Per request: (sum of the continuation's log-probs, whether every token was the argmax)."""
        prompts, starts = [], []
        for context, continuation in requests:
            context = truncate_left(context, continuation, self.max_len)
            prompts.append(context + continuation)
            starts.append(len(context))
        results = []
        for start in range(0, len(prompts), 256):
            chunk = self.llm.score(prompts[start:start + 256], starts[start:start + 256], on_finished=progress)
            results += [(float(r["logprob"].double().sum()), bool(r["greedy"].all())) for r in chunk]
        return results

    def close(self) -> None:
        self.llm.shutdown()


def window_offsets(windows: Windows) -> list[int]:
    """Where each window's scored tokens start in the concatenated rows ([W + 1])."""
    length = windows.ids.shape[1]
    offsets = [0]
    for first in windows.score_from:
        offsets.append(offsets[-1] + length - first)
    return offsets
