"""The one stop rule, and where a model's EOS ids and default sampling come from.

`token_stop` decides after every sampled token whether the sequence ends: the scheduler calls
it for every sequence it advances, `check_token_stop` (the detokenizer's and the tests' form)
calls it too. EOS is the union of the ids the tokenizer, config.json and generation_config.json
name (Llama 3 Instruct ends turns with <|eot_id|> but its tokenizer's EOS is <|end_of_text|>).

generation_config.json may also carry the model's recommended sampling (temperature, top_p,
top_k, min_p, repetition_penalty); as in vLLM, they are the defaults of requests that leave
those fields out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from llmctl.sampling_params import SamplingParams, eos_token_ids

# generation_config.json keys that become request defaults (vLLM's list, without max_new_tokens).
SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def token_stop(params: SamplingParams, num_output_tokens: int, last_token_id: int,
               eos_ids: Sequence[int], max_new_tokens: int | None) -> tuple[str | None, int | None]:
    """(finish_reason, stop_reason) after the latest token: ("stop", None) for EOS, ("stop",
    token_id) for a stop token id, ("length", None) at max_new_tokens, else (None, None).
    EOS and stop tokens count only once min_tokens tokens exist; ignore_eos disables EOS."""
    if num_output_tokens >= params.min_tokens:
        if not params.ignore_eos and last_token_id in eos_ids:
            return "stop", None
        if last_token_id in params.stop_token_ids:
            return "stop", last_token_id
    if max_new_tokens is not None and num_output_tokens >= max_new_tokens:
        return "length", None
    return None, None


def check_token_stop(params: SamplingParams, output_token_ids: Sequence[int],
                     eos_token_id: int | Sequence[int] | None,
                     max_new_tokens: int | None) -> tuple[str | None, int | None]:
    """`token_stop` for a whole output so far (None, None for an empty one)."""
    if len(output_token_ids) == 0:
        return None, None
    return token_stop(params, len(output_token_ids), output_token_ids[-1], eos_token_ids(eos_token_id),
                      max_new_tokens)


def read_generation_config(model_dir: Path | str | None) -> dict[str, Any]:
    """generation_config.json of a model dir as a dict ({} when absent or unreadable)."""
    if model_dir is None:
        return {}
    path = Path(model_dir) / "generation_config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_eos_token_ids(tokenizer: Any, config_eos: Sequence[int], generation_config: dict[str, Any]) -> tuple[int, ...]:
    """The union, in that order, of the tokenizer's, config.json's and generation_config.json's EOS ids."""
    ids: list[int] = []
    for source in (getattr(tokenizer, "eos_token_id", None), list(config_eos),
                   generation_config.get("eos_token_id")):
        for token_id in eos_token_ids(source) if not isinstance(source, list) else source:
            if isinstance(token_id, int) and not isinstance(token_id, bool) and token_id not in ids:
                ids.append(token_id)
    return tuple(ids)


def sampling_defaults(generation_config: dict[str, Any]) -> dict[str, Any]:
    """The sampling fields generation_config.json sets, checked as SamplingParams checks them
    (a value SamplingParams would refuse is left out)."""
    defaults = {}
    for key in SAMPLING_DEFAULT_KEYS:
        value = generation_config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        try:
            SamplingParams(**{key: value})
        except ValueError:
            continue
        defaults[key] = value
    return defaults
