"""Eval against any OpenAI-compatible server: /v1/completions with token-id prompts, `echo`
and `logprobs: 1`, as lm-eval's `local-completions` model asks (llmctl serve and vLLM answer
it). The server gives the log-prob of each prompt token and its top-1 alternative, which is
enough for perplexity, cloze and multiple choice, not for KLD."""

from __future__ import annotations

import torch

from llmctl.errors import LlmctlError
from llmctl.eval.backends import LoglikelihoodRequest, Progress, truncate_left
from llmctl.eval.windows import Windows

_BATCH = 16  # prompts per HTTP request


class ServerError(LlmctlError):
    """The server failed or answered without what eval needs."""


class ServerBackend:
    kind = "server"

    def __init__(self, base_url: str, model: str, tokenizer, api_key: str | None = None,
                 max_len: int | None = None) -> None:
        import httpx

        self.base_url, self.model, self.tokenizer = base_url.rstrip("/"), model, tokenizer
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=600.0)
        # one slot stays free for the token the request generates
        self.max_len = (max_len or self._served_max_len() or 2048) - 1

    def _served_max_len(self) -> int | None:
        """max_model_len as /v1/models states it (vLLM and llmctl serve do), if it does."""
        import httpx

        try:
            data = self.client.get("/v1/models").json().get("data", [])
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        lens = [m.get("max_model_len") for m in data if isinstance(m, dict) and m.get("id") == self.model]
        return lens[0] if lens and isinstance(lens[0], int) else None

    def describe(self) -> dict:
        return {"backend": "server", "base_url": self.base_url, "model": self.model, "device": "server",
                "dtype": None}

    def _echo(self, prompts: list[list[int]]) -> list[dict]:
        import httpx

        body = {"model": self.model, "prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1,
                "temperature": 0.0}
        try:
            resp = self.client.post("/v1/completions", json=body)
        except httpx.HTTPError as err:
            raise ServerError(f"--base-url: {self.base_url} did not answer: {err}") from err
        if resp.status_code != 200:
            raise ServerError(f"--base-url: /v1/completions answered {resp.status_code}: {resp.text[:300]}")
        choices = sorted(resp.json().get("choices", []), key=lambda c: c.get("index", 0))
        out = []
        for prompt, choice in zip(prompts, choices):
            lp = choice.get("logprobs") or {}
            tokens, top = lp.get("token_logprobs"), lp.get("top_logprobs")
            if not tokens or len(tokens) < len(prompt) or not top:
                raise ServerError(f"--base-url: {self.base_url} returned no prompt logprobs for echo=true",
                                  hint="the server must support /v1/completions with echo and logprobs "
                                       "(llmctl serve and vLLM do)")
            out.append({"logprobs": tokens[:len(prompt)], "top": top[:len(prompt)], "tokens": lp["tokens"]})
        if len(out) != len(prompts):
            raise ServerError(f"--base-url: {len(prompts)} prompts sent, {len(out)} choices came back")
        return out

    def window_scores(self, windows: Windows, base: dict | None, progress: Progress | None = None) -> dict:
        parts = []
        prompts = [w.tolist() for w in windows.ids]
        for start in range(0, len(prompts), _BATCH):
            batch = prompts[start:start + _BATCH]
            for i, echo in enumerate(self._echo(batch), start):
                parts.append(torch.tensor(echo["logprobs"][windows.score_from[i]:], dtype=torch.float32))
            if progress:
                progress(len(batch))
        return {"logprob": torch.cat(parts)}

    def loglikelihood(self, requests: list[LoglikelihoodRequest], progress: Progress | None = None
                      ) -> list[tuple[float, bool]]:
        results = []
        for start in range(0, len(requests), _BATCH):
            batch = requests[start:start + _BATCH]
            prompts, starts = [], []
            for context, continuation in batch:
                context = truncate_left(context, continuation, self.max_len)
                prompts.append(context + continuation)
                starts.append(len(context))
            for first, echo in zip(starts, self._echo(prompts)):
                lps = echo["logprobs"][first:]
                greedy = all(max(top, key=top.get) == token
                             for top, token in zip(echo["top"][first:], echo["tokens"][first:]))
                results.append((float(sum(lps)), greedy))
            if progress:
                progress(len(batch))
        return results

    def close(self) -> None:
        self.client.close()
