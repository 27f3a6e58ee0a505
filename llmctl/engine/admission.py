"""Admission: every per-request limit, checked once before a request enters the engine.

`LLMEngine.add_request` calls `check_request` for every request, and the server calls it
(through the same function) before any work is queued and before a stream sends a byte, so
a request is refused with the same `InvalidRequestError` in-process and over HTTP. Inside a
step these limits are invariants: a value that slipped through fails its own request only.

The bounds (vLLM's are the guide; OpenAI's are tighter where it has one):

    prompt token ids        integers in [0, vocab_size), at least one, at most max_model_len
    n                       at most max_num_seqs (the n samples must fit in one batch)
    stop                    at most MAX_STOP_STRINGS strings of at most MAX_STOP_STRING_CHARS characters
    stop_token_ids          at most MAX_STOP_TOKEN_IDS ids, each in [0, vocab_size)
    logit_bias              at most MAX_LOGIT_BIAS entries, ids in [0, vocab_size), values in [-100, 100]
    logprobs, prompt_logprobs   at most MAX_LOGPROBS (SamplingParams checks it on construction)
    prompts per request     at most MAX_PROMPTS_PER_REQUEST (the server's completions endpoint)
    max_tokens              prompt + max_tokens within max_model_len (the server's rule, `check_context`)
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

from llmctl.errors import InvalidRequestError
from llmctl.sampling_params import SamplingParams

MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024
MAX_PROMPTS_PER_REQUEST = 256

@dataclass(frozen=True)
class AdmissionLimits:
    """What one engine can take: its vocabulary, context and batch."""

    vocab_size: int
    max_model_len: int
    max_num_seqs: int


def check_token_ids(token_ids: Sequence[object], vocab_size: int, param: str = "prompt") -> None:
    """Every id an integer (not a bool) in [0, vocab_size)."""
    for t in token_ids:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise InvalidRequestError(f"{param}: token ids must be integers, got {t!r}")
        if not 0 <= t < vocab_size:
            raise InvalidRequestError(f"{param}: token id {t} is outside the vocabulary [0, {vocab_size})")


def check_n(n: int, max_num_seqs: int) -> None:
    """The n samples of a request must fit in one batch."""
    if n > max_num_seqs:
        raise InvalidRequestError(f"n: {n} samples exceed max_num_seqs ({max_num_seqs})")


def check_num_prompts(num_prompts: int) -> None:
    if num_prompts == 0:
        raise InvalidRequestError("prompt: must not be empty")
    if num_prompts > MAX_PROMPTS_PER_REQUEST:
        raise InvalidRequestError(f"prompt: {num_prompts} prompts in one request, more than "
                                  f"{MAX_PROMPTS_PER_REQUEST}", hint="split the batch over several requests")


def check_params(params: SamplingParams, limits: AdmissionLimits) -> None:
    """The limits of one request's sampling parameters that depend on the engine (or are sizes)."""
    check_n(params.n, limits.max_num_seqs)
    if len(params.stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError(f"stop: {len(params.stop)} stop strings, more than {MAX_STOP_STRINGS}")
    longest = max((len(s) for s in params.stop), default=0)
    if longest > MAX_STOP_STRING_CHARS:
        raise InvalidRequestError(f"stop: a stop string of {longest} characters, more than {MAX_STOP_STRING_CHARS}")
    if len(params.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequestError(f"stop_token_ids: {len(params.stop_token_ids)} ids, more than {MAX_STOP_TOKEN_IDS}")
    check_token_ids(params.stop_token_ids, limits.vocab_size, "stop_token_ids")
    if params.logit_bias:
        if len(params.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError(f"logit_bias: {len(params.logit_bias)} entries, more than {MAX_LOGIT_BIAS}")
        check_token_ids(list(params.logit_bias), limits.vocab_size, "logit_bias")


def check_request(prompt_token_ids: Sequence[int], params: SamplingParams, limits: AdmissionLimits) -> None:
    """Refuse what the engine must not take: raises InvalidRequestError naming the field."""
    if len(prompt_token_ids) == 0:
        raise InvalidRequestError("prompt: the prompt is empty")
    check_token_ids(prompt_token_ids, limits.vocab_size)
    if len(prompt_token_ids) > limits.max_model_len:
        raise InvalidRequestError(
            f"prompt: {len(prompt_token_ids)} tokens, more than max_model_len ({limits.max_model_len})",
            hint="shorten the prompt or raise max_model_len")
    check_params(params, limits)


def check_context(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int,
                  param: str = "prompt") -> int:
    """The server's context rule (vLLM's): the prompt leaves room for one token and prompt +
    max_tokens fits in max_model_len. Returns max_tokens, None filled with what is left."""
    if num_prompt_tokens == 0:
        raise InvalidRequestError(f"{param}: the prompt is empty")
    if num_prompt_tokens >= max_model_len:
        raise InvalidRequestError(
            f"{param}: this model's maximum context length is {max_model_len} tokens, "
            f"but the prompt has {num_prompt_tokens} tokens")
    if max_tokens is None:
        return max_model_len - num_prompt_tokens
    if num_prompt_tokens + max_tokens > max_model_len:
        raise InvalidRequestError(
            f"max_tokens: this model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, "
            f"{max_tokens} in the completion). Please reduce the length of the prompt or completion.")
    return max_tokens
