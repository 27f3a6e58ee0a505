"""`SamplingParams`: how one request is sampled and when it stops, under vLLM's names, and
`Logprobs`, one position's logprobs. Both the engine and the sampler layer use them, so they
live below both (as `vllm.sampling_params` does)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Sequence

from llmctl.errors import InvalidRequestError

# One position's logprobs: token id -> logprob, the chosen token first, then the top-k.
Logprobs = dict[int, float]

# vLLM's default cap on logprobs and prompt_logprobs per position.
MAX_LOGPROBS = 20


def eos_token_ids(eos_token_id: int | Sequence[int] | None) -> list[int]:
    """The model's EOS as a list, whether the config gives none, one or several ids."""
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def _require(cond: bool, name: str, why: str) -> None:
    if not cond:
        raise InvalidRequestError(f"{name}: {why}")


def _require_int(value: object, name: str) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool), name,
             f"must be an integer, got {type(value).__name__} {value!r}")


def _require_finite(value: object, name: str) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    _require(ok, name, f"must be a finite number, got {value!r}")


class RequestOutputKind(enum.Enum):
    """Which outputs `LLMEngine.step` returns for a request (vLLM's names): the cumulative output
    after every step that gave it a token, or only the finished one. `LLM.generate` asks for
    FINAL_ONLY, so a step builds no output object a caller would drop."""

    CUMULATIVE = 0
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    """One request's sampling and stopping, validated on construction (InvalidRequestError names the field).

    temperature 0 is greedy. `ignore_eos` is the engine's business (EOS then neither stops the
    sequence nor is masked by min_tokens); the sampler masks EOS and stop_token_ids while
    fewer than min_tokens tokens were generated. logprobs are the model's raw log-softmax.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    logprobs: int | None = None  # top-k logprobs per generated token (0: only the sampled one)
    prompt_logprobs: int | None = None  # same, for prompt positions
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100] (OpenAI's range)
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _require(isinstance(self.stop, (list, tuple)) or self.stop is None, "stop",
                 f"must be a string or a list of strings, got {type(self.stop).__name__}")
        self.stop = list(self.stop or [])
        _require(isinstance(self.stop_token_ids, (list, tuple)) or self.stop_token_ids is None, "stop_token_ids",
                 f"must be a list of token ids, got {type(self.stop_token_ids).__name__}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        _require(isinstance(self.output_kind, RequestOutputKind), "output_kind",
                 f"must be a RequestOutputKind, got {self.output_kind!r}")
        for name in ("n", "top_k", "min_tokens"):
            _require_int(getattr(self, name), name)
        for name in ("max_tokens", "seed", "logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _require_int(getattr(self, name), name)
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            _require_finite(getattr(self, name), name)
        if self.top_k == 0:
            self.top_k = -1
        _require(self.n >= 1, "n", f"must be at least 1, got {self.n}")
        _require(self.temperature >= 0.0, "temperature", f"must be non-negative, got {self.temperature}")
        _require(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _require(self.top_k == -1 or self.top_k >= 1, "top_k", f"must be -1 (off) or at least 1, got {self.top_k}")
        _require(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        _require(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        _require(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        _require(self.repetition_penalty > 0.0, "repetition_penalty", f"must be positive, got {self.repetition_penalty}")
        _require(self.seed is None or 0 <= self.seed < 2**64, "seed", f"must be in [0, 2**64), got {self.seed}")
        _require(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", f"must be at least 1, got {self.max_tokens}")
        _require(self.min_tokens >= 0, "min_tokens", f"must be non-negative, got {self.min_tokens}")
        _require(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
                 f"must not exceed max_tokens ({self.max_tokens}), got {self.min_tokens}")
        _require(self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs",
                 f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        _require(self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS, "prompt_logprobs",
                 f"must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}")
        _require(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        _require(all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids),
                 "stop_token_ids", f"must be non-negative integer token ids, got {self.stop_token_ids}")
        if self.logit_bias is not None:
            self._check_logit_bias()

    def _check_logit_bias(self) -> None:
        _require(isinstance(self.logit_bias, dict), "logit_bias",
                 f"must map token ids to numbers, got {type(self.logit_bias).__name__}")
        for token_id, bias in self.logit_bias.items():
            _require(isinstance(token_id, int) and not isinstance(token_id, bool) and token_id >= 0, "logit_bias",
                     f"keys must be non-negative integer token ids, got {token_id!r}")
            _require_finite(bias, "logit_bias")
            _require(-100.0 <= bias <= 100.0, "logit_bias", f"values must be in [-100, 100], got {bias}")

    def all_stop_token_ids(self, eos_token_id: int | Sequence[int] | None) -> list[int]:
        """Tokens that end the sequence: the EOS id(s) (unless ignore_eos), then stop_token_ids.

        eos_token_id may list several ids (Llama 3's generation config has two)."""
        ids = [] if self.ignore_eos else eos_token_ids(eos_token_id)
        return ids + [t for t in self.stop_token_ids if t not in ids]

    def sample_seed(self, index: int) -> int | None:
        """Seed of sample `index` of n: seed + index (as vLLM does), so the n samples differ."""
        return None if self.seed is None else (self.seed + index) % 2**64

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5
