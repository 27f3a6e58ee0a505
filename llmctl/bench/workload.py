"""What `llmctl bench serve` sends: prompts of exact token lengths and their output lengths,
a pure function of the workload config, its seed and the model's tokenizer.

Datasets:
- `random`: token ids drawn uniformly from the ordinary tokens of a fixed slice of the
  embedded corpus, decoded to text and trimmed or padded until the text re-encodes to
  exactly the drawn length (`--random-range-ratio` spreads lengths around the mean,
  `--random-prefix-len` puts one shared prefix in front of every prompt).
- `corpus`: windows of the embedded Wikipedia text with lengths drawn from a chat-like
  distribution (`CHAT_LENGTHS`), cut to exact token counts the same way.
- a JSONL file: one `{"prompt": ...}` or `{"messages": [...]}` (or ShareGPT
  `{"conversations": [...]}`) per line, with an optional `output_len` (or `max_tokens`).

Prompt lengths count the text's tokens, without the special tokens a tokenizer adds
(a BOS); on the chat endpoint they count the user message, not the chat template.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from llmctl.bench.tokenizer import BenchTokenizer
from llmctl.errors import ConfigError, LlmctlError

# Chat-like lengths of `--dataset corpus`: log-normal input and output token counts whose
# means are those of ShareGPT conversations as the vLLM paper reports them (Kwon et al.,
# SOSP 2023, Fig. 11: 161 input and 338 output tokens on average), with a median of about
# 0.6 of the mean, the long right tail of real chat traffic. Clipped to [MIN, MAX].
CHAT_LENGTHS = {"input_mean": 161.0, "input_sigma": 1.0, "output_mean": 338.0, "output_sigma": 0.8,
                "min": 4, "input_max": 4096, "output_max": 2048}
_POOL_ARTICLES = 200  # articles whose tokens make the random dataset's pool
_MAX_FIT_TRIES = 64


class WorkloadError(LlmctlError):
    """The workload cannot be built as asked (bad file, lengths that do not fit)."""


@dataclass(frozen=True)
class WorkloadConfig:
    dataset: str = "random"  # random | corpus | path of a JSONL file
    num_prompts: int = 64
    input_len: int = 128
    output_len: int | None = 128  # None: drawn (corpus) or from the file, else 128
    range_ratio: float = 0.0
    prefix_len: int = 0
    chat: bool = False  # requests carry `messages` (the chat endpoint)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ConfigError(f"--num-prompts: must be at least 1, got {self.num_prompts}")
        if self.input_len < 1:
            raise ConfigError(f"--random-input-len: must be at least 1, got {self.input_len}")
        if self.output_len is not None and self.output_len < 1:
            raise ConfigError(f"--random-output-len: must be at least 1, got {self.output_len}")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ConfigError(f"--random-range-ratio: must be in [0, 1), got {self.range_ratio}")
        if self.prefix_len < 0:
            raise ConfigError(f"--random-prefix-len: must be >= 0, got {self.prefix_len}")

    @property
    def needs_tokenizer(self) -> bool:
        return self.dataset in ("random", "corpus")


@dataclass(frozen=True)
class BenchRequest:
    index: int
    prompt: str
    messages: tuple[dict, ...] | None  # set on the chat endpoint
    prompt_len: int | None  # tokens of the text as the tokenizer counts them; None: not counted
    output_len: int

    def body(self, model: str) -> dict:
        """The streaming request body, EOS ignored so that output_len tokens come back."""
        body = {"model": model, "max_tokens": self.output_len, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True}
        if self.messages is not None:
            body["messages"] = [dict(m) for m in self.messages]
        else:
            body["prompt"] = self.prompt
        return body


def build_workload(cfg: WorkloadConfig, tokenizer: BenchTokenizer | None,
                   max_model_len: int | None = None) -> list[BenchRequest]:
    if cfg.needs_tokenizer and tokenizer is None:
        raise WorkloadError(f"--dataset {cfg.dataset}: needs the model's tokenizer",
                            hint="pass --tokenizer DIR, or use a server with /tokenize")
    if cfg.dataset == "random":
        return _random_workload(cfg, tokenizer, max_model_len)
    if cfg.dataset == "corpus":
        return _corpus_workload(cfg, tokenizer, max_model_len)
    return _file_workload(cfg, tokenizer)


def workload_digest(requests: Sequence[BenchRequest]) -> str:
    """A short hash of what is sent: equal digests, equal workloads."""
    text = json.dumps([[r.prompt, r.messages, r.output_len] for r in requests], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe(cfg: WorkloadConfig, requests: Sequence[BenchRequest]) -> dict:
    """The workload as the report records it."""
    lens = [r.prompt_len for r in requests if r.prompt_len is not None]
    out = {**asdict(cfg), "digest": workload_digest(requests), "num_requests": len(requests),
           "mean_prompt_len": float(np.mean(lens)) if lens else None,
           "mean_output_len": float(np.mean([r.output_len for r in requests]))}
    if cfg.dataset == "corpus":
        out["chat_lengths"] = dict(CHAT_LENGTHS)
    return out


# --- exact lengths --------------------------------------------------------------------

def fit_text(tok: BenchTokenizer, head: str, ids: list[int], target: int, pool: Sequence[int],
             rng: random.Random) -> str:
    """Text that, after `head`, makes `head + text` encode to exactly `target` tokens:
    decode `ids`, re-encode, cut or pad with tokens from `pool`, until it holds."""
    base = len(tok.encode(""))  # special tokens the tokenizer adds (a BOS)
    for _ in range(_MAX_FIT_TRIES):
        text = tok.decode(ids)
        n = len(tok.encode(head + text)) - base
        if n == target:
            return text
        if n > target:
            if not ids:
                break
            ids = ids[:max(0, len(ids) - (n - target))]
        else:
            ids = ids + rng.choices(pool, k=target - n)
    raise WorkloadError(f"could not make a prompt of exactly {target} tokens in {_MAX_FIT_TRIES} tries",
                        hint="this tokenizer does not round-trip its own tokens; use --dataset FILE")


def _lengths(rng: np.random.Generator, mean: int, ratio: float, n: int) -> list[int]:
    lo, hi = max(1, math.floor(mean * (1 - ratio))), max(1, math.ceil(mean * (1 + ratio)))
    return [int(v) for v in rng.integers(lo, hi + 1, size=n)]


def _pool(tok: BenchTokenizer) -> list[int]:
    from llmctl.eval.corpus import load_corpus_split

    articles = load_corpus_split().train[:_POOL_ARTICLES]
    ids: set[int] = set()
    for k in range(0, len(articles), 10):  # small bodies: servers cap their size (llmctl: --max-request-bytes)
        ids.update(tok.encode("\n\n".join(articles[k:k + 10])))
    return sorted(ids - set(tok.encode("")))


def _map(fn: Callable[[int], BenchRequest], n: int, tok: BenchTokenizer) -> list[BenchRequest]:
    # Each request's randomness comes from its own seed, so the order of work does not matter.
    if tok.parallel:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(fn, range(n)))
    return [fn(i) for i in range(n)]


def _request(cfg: WorkloadConfig, i: int, text: str, prompt_len: int | None, output_len: int) -> BenchRequest:
    messages = ({"role": "user", "content": text},) if cfg.chat else None
    return BenchRequest(index=i, prompt=text, messages=messages, prompt_len=prompt_len, output_len=output_len)


def _random_workload(cfg: WorkloadConfig, tok: BenchTokenizer, max_model_len: int | None) -> list[BenchRequest]:
    rng = np.random.default_rng(cfg.seed)
    in_lens = _lengths(rng, cfg.input_len, cfg.range_ratio, cfg.num_prompts)
    out_lens = _lengths(rng, cfg.output_len or 128, cfg.range_ratio, cfg.num_prompts)
    _check_fits(cfg.prefix_len, in_lens, out_lens, max_model_len)
    pool = _pool(tok)
    prefix_rng = random.Random(f"{cfg.seed}:prefix")
    prefix = fit_text(tok, "", prefix_rng.choices(pool, k=cfg.prefix_len), cfg.prefix_len, pool,
                      prefix_rng) if cfg.prefix_len else ""

    def one(i: int) -> BenchRequest:
        r = random.Random(f"{cfg.seed}:{i}")
        target = cfg.prefix_len + in_lens[i]
        suffix = fit_text(tok, prefix, r.choices(pool, k=in_lens[i]), target, pool, r)
        return _request(cfg, i, prefix + suffix, target, out_lens[i])

    return _map(one, cfg.num_prompts, tok)


def _chat_lengths(rng: np.random.Generator, n: int) -> tuple[list[int], list[int]]:
    c = CHAT_LENGTHS

    def draw(mean: float, sigma: float, hi: int) -> list[int]:
        mu = math.log(mean) - sigma * sigma / 2  # the log-normal's mean is exp(mu + sigma^2 / 2)
        return [int(min(hi, max(c["min"], round(v)))) for v in rng.lognormal(mu, sigma, size=n)]

    return draw(c["input_mean"], c["input_sigma"], c["input_max"]), draw(c["output_mean"], c["output_sigma"], c["output_max"])


def _corpus_workload(cfg: WorkloadConfig, tok: BenchTokenizer, max_model_len: int | None) -> list[BenchRequest]:
    from llmctl.eval.corpus import load_corpus_split

    rng = np.random.default_rng(cfg.seed)
    in_lens, out_lens = _chat_lengths(rng, cfg.num_prompts)
    if cfg.output_len is not None:
        out_lens = [cfg.output_len] * cfg.num_prompts
    if max_model_len:  # the long tail is cut to what the server holds
        in_lens = [max(1, min(n, max_model_len - o - 1)) for n, o in zip(in_lens, out_lens)]
    _check_fits(0, in_lens, out_lens, max_model_len)
    articles = load_corpus_split().train
    pool = _pool(tok)

    def one(i: int) -> BenchRequest:
        r = random.Random(f"{cfg.seed}:{i}")
        start, text = r.randrange(len(articles)), ""
        while len(text) < 8 * in_lens[i] + 64:  # English: about 4-5 characters a token
            text += articles[start % len(articles)] + "\n\n"
            start += 1
        ids = tok.encode(text)[len(tok.encode("")):][:in_lens[i]]
        return _request(cfg, i, fit_text(tok, "", ids, in_lens[i], pool, r), in_lens[i], out_lens[i])

    return _map(one, cfg.num_prompts, tok)


def _check_fits(prefix_len: int, in_lens: list[int], out_lens: list[int], max_model_len: int | None) -> None:
    if not max_model_len:
        return
    longest = max(prefix_len + a + b for a, b in zip(in_lens, out_lens))
    if longest > max_model_len:
        raise WorkloadError(f"prompts and outputs up to {longest} tokens, past the server's "
                            f"max_model_len of {max_model_len}", hint="lower --random-input-len or --random-output-len")


def _file_workload(cfg: WorkloadConfig, tok: BenchTokenizer | None) -> list[BenchRequest]:
    rows = _read_jsonl(Path(cfg.dataset))
    order = np.random.default_rng(cfg.seed).permutation(len(rows))
    picked = [rows[order[i % len(rows)]] for i in range(cfg.num_prompts)]
    out = []
    for i, (messages, output_len) in enumerate(picked):
        text = "\n".join(m["content"] for m in messages)
        n_out = cfg.output_len or output_len or 128
        prompt_len = len(tok.encode(text)) - len(tok.encode("")) if tok is not None else None
        chat = tuple(messages) if cfg.chat else None
        out.append(BenchRequest(index=i, prompt=text, messages=chat, prompt_len=prompt_len, output_len=n_out))
    return out


def _read_jsonl(path: Path) -> list[tuple[list[dict], int | None]]:
    if not path.is_file():
        raise ConfigError(f"--dataset: {path} is not random, corpus or a JSONL file",
                          hint="a file with one {\"prompt\": ...} or {\"messages\": [...]} per line")
    rows = []
    for num, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(_parse_row(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise WorkloadError(f"--dataset {path}: line {num}: {err}",
                                hint="each line: {\"prompt\": str} or {\"messages\": [{\"role\", \"content\"}]}, "
                                     "optional \"output_len\"") from None
    if not rows:
        raise WorkloadError(f"--dataset {path}: no prompts in the file")
    return rows


def _parse_row(row: dict) -> tuple[list[dict], int | None]:
    output_len = row.get("output_len", row.get("max_tokens"))
    if output_len is not None and (not isinstance(output_len, int) or output_len < 1):
        raise ValueError(f"output_len must be a positive integer, got {output_len!r}")
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise ValueError("prompt must be a string")
        return [{"role": "user", "content": row["prompt"]}], output_len
    turns = row["messages"] if "messages" in row else row["conversations"]
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    messages = [{"role": roles[t.get("role", t.get("from"))], "content": str(t.get("content", t.get("value")))}
                for t in turns]
    while messages and messages[-1]["role"] == "assistant":  # a recorded answer is not sent
        messages.pop()
    if not messages:
        raise ValueError("no user turn")
    return messages, output_len
