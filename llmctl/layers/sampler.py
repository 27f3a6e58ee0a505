"""The sampler: one batched call per engine step turns logits into next tokens and logprobs.

How the model runner uses it, once per step, for the B sequences that sample::

    requests = [(seq.sampling_params, seq.prompt_token_ids, seq.output_token_ids, seq.generator)
                for seq in sampling_seqs]
    metadata = SamplingMetadata.build(requests, vocab_size=V, eos_token_id=tokenizer.eos_token_id,
                                      device=logits.device)
    out = sampler(logits, metadata)            # logits: [B, V], one row per sequence
    next_ids = out.sampled_token_ids.tolist()  # [B]
    if out.logprobs is not None:               # some row asked for logprobs
        per_row = out.logprobs.tolists(metadata.num_logprobs)  # list[Logprobs | None]
        sampled_logprob = out.logprobs.logprobs[:, 0]        # for cumulative_logprob

A sequence with `params.seed` owns a generator made once with `make_generator(seed, device)`
and kept for its whole life (n > 1: sample i uses `params.sample_seed(i)`); its state advances
only when that sequence samples, so its tokens do not depend on the rest of the batch.

Order of operations (vLLM's): raw logprobs (log-softmax of the model's logits, what
clients compare) -> penalties -> logit_bias -> min_tokens mask -> greedy argmax for temperature-0 rows ->
temperature -> min-p -> top-k -> top-p -> exponential-race sample. On CUDA the steps from
temperature on are one kernel (llmctl_kernels/sampling.py: top-p by rejection, no sort of the
vocabulary; a topk finds top-k's threshold); on the CPU they are the torch ops of
`logits_processors`. Both draw from the same distribution, with different random streams.

Stopping is not the sampler's job: the engine checks EOS (skipped when `ignore_eos`),
`stop_token_ids` and `max_tokens` with `llmctl.engine.detokenizer.check_token_stop`, and stop
strings with `IncrementalDetokenizer`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from llmctl.errors import InvalidRequestError
from llmctl.layers import logits_processors as lp
from llmctl.sampling_params import Logprobs, SamplingParams

SamplingRequest = tuple[SamplingParams, Sequence[int], Sequence[int], "torch.Generator | None"]


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The per-sequence generator of a seeded request, on the device the logits live on."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass(frozen=True)
class SamplingMetadata:
    """Everything the sampler needs for one step, as tensors; built once per step."""

    temperature: torch.Tensor | None  # [B] fp32, greedy rows hold 1.0 so the division is a no-op; None if all greedy
    is_greedy: torch.Tensor | None  # [B] bool; None when all rows are greedy or none is
    all_greedy: bool
    all_random: bool
    top_p: torch.Tensor | None  # [B] fp32; None when no row uses it
    top_k: torch.Tensor | None  # [B] int64 in [1, V]; None when no row uses it
    max_top_k: int | None  # max(top_k) when every row has one (greedy rows count as 1)
    min_p: torch.Tensor | None  # [B] fp32; None when no row uses it
    penalties: lp.PenaltyTensors | None
    min_tokens_mask: tuple[torch.Tensor, torch.Tensor] | None  # ([M] rows, [M] token ids) to forbid
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # ([M] rows, [M] token ids, [M] fp32 biases)
    generators: dict[int, torch.Generator]  # row -> generator, seeded random rows only
    num_logprobs: tuple[int | None, ...]  # per row, params.logprobs
    max_num_logprobs: int | None  # None: no row wants logprobs

    @classmethod
    def build(
        cls,
        requests: Sequence[SamplingRequest],
        vocab_size: int,
        eos_token_id: int | Sequence[int] | None,
        device: torch.device | str = "cpu",
    ) -> "SamplingMetadata":
        """requests: (params, prompt_token_ids, output_token_ids, generator) per row."""
        params = [r[0] for r in requests]
        greedy = [p.greedy for p in params]

        def floats(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        # Greedy rows take k = 1: their draw is discarded, and a small k keeps top-k cheap.
        top_k = [1 if g else vocab_size if p.top_k < 1 else min(p.top_k, vocab_size) for p, g in zip(params, greedy)]
        use_top_p = any(p.top_p < 1.0 and not g for p, g in zip(params, greedy))
        use_top_k = any(k < vocab_size and not g for k, g in zip(top_k, greedy))
        max_top_k = max(top_k) if use_top_k and max(top_k) < vocab_size else None
        use_min_p = any(p.min_p > 0.0 and not g for p, g in zip(params, greedy))
        generators: dict[int, torch.Generator] = {}
        for row, (p, _, _, gen) in enumerate(requests):
            if p.seed is not None and not p.greedy:
                if gen is None:
                    raise InvalidRequestError(f"seed: row {row} has seed {p.seed} but no generator; "
                                              "create one per sequence with make_generator()")
                if gen.device.type != torch.device(device).type:
                    raise InvalidRequestError(f"seed: row {row}'s generator is on {gen.device}, the logits on {device}")
                generators[row] = gen
        num_logprobs = tuple(p.logprobs for p in params)
        wanted = [k for k in num_logprobs if k is not None]
        return cls(
            # A batch of greedy rows never reads temperature or the mask: two fewer copies per step.
            temperature=None if all(greedy) else floats([1.0 if g else p.temperature
                                                         for p, g in zip(params, greedy)]),
            is_greedy=torch.tensor(greedy, dtype=torch.bool, device=device) if 0 < sum(greedy) < len(greedy) else None,
            all_greedy=all(greedy),
            all_random=not any(greedy),
            top_p=floats([p.top_p for p in params]) if use_top_p else None,
            top_k=torch.tensor(top_k, dtype=torch.int64, device=device) if use_top_k else None,
            max_top_k=max_top_k,
            min_p=floats([p.min_p for p in params]) if use_min_p else None,
            penalties=_build_penalties(requests, device),
            min_tokens_mask=_build_min_tokens_mask(requests, vocab_size, eos_token_id, device),
            logit_bias=_build_logit_bias(params, vocab_size, device),
            generators=generators,
            num_logprobs=num_logprobs,
            max_num_logprobs=max(wanted) if wanted else None,
        )


def _flatten(histories: list[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """([N] row of each token, [N] token ids): one pass over the ids, no padding."""
    lengths = [len(h) for h in histories]
    ids = np.fromiter(itertools.chain.from_iterable(histories), dtype=np.int64, count=sum(lengths))
    rows = np.repeat(np.arange(len(histories), dtype=np.int64), lengths)
    return torch.from_numpy(rows).to(device), torch.from_numpy(ids).to(device)


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def reads_token_history(p: SamplingParams) -> bool:
    """Whether a row's prompt and output token ids are read (penalties, min_tokens): the other
    rows may pass empty histories, and a step copies no token list for them."""
    return p.min_tokens > 0 or _has_penalty(p)


def _build_penalties(requests: Sequence[SamplingRequest], device) -> lp.PenaltyTensors | None:
    """Histories are read in Python once per step: O(total tokens) for rows with penalties."""
    if not any(_has_penalty(r[0]) for r in requests):
        return None
    # Histories of rows without penalties are left out: their counts are never used.
    prompt_rows, prompt_ids = _flatten([r[1] if r[0].repetition_penalty != 1.0 else () for r in requests], device)
    output_rows, output_ids = _flatten([r[2] if _has_penalty(r[0]) else () for r in requests], device)
    params = [r[0] for r in requests]

    def floats(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device)

    return lp.PenaltyTensors(
        prompt_rows=prompt_rows, prompt_token_ids=prompt_ids, output_rows=output_rows, output_token_ids=output_ids,
        repetition_penalties=floats([p.repetition_penalty for p in params]),
        frequency_penalties=floats([p.frequency_penalty for p in params]),
        presence_penalties=floats([p.presence_penalty for p in params]),
    )


def _build_min_tokens_mask(requests, vocab_size: int, eos_token_id: int | Sequence[int] | None, device):
    rows: list[int] = []
    cols: list[int] = []
    for row, (p, _, output_ids, _) in enumerate(requests):
        if len(output_ids) >= p.min_tokens:
            continue
        for token_id in p.all_stop_token_ids(eos_token_id):
            if not 0 <= token_id < vocab_size:
                raise InvalidRequestError(f"stop_token_ids: {token_id} is outside the vocabulary [0, {vocab_size})")
            rows.append(row)
            cols.append(token_id)
    if not rows:
        return None
    return (torch.tensor(rows, dtype=torch.int64, device=device), torch.tensor(cols, dtype=torch.int64, device=device))


def _build_logit_bias(params: Sequence[SamplingParams], vocab_size: int, device):
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    for row, p in enumerate(params):
        for token_id, bias in (p.logit_bias or {}).items():
            if not 0 <= token_id < vocab_size:  # admission's invariant
                raise InvalidRequestError(f"logit_bias: {token_id} is outside the vocabulary [0, {vocab_size})")
            rows.append(row)
            cols.append(token_id)
            values.append(float(bias))
    if not rows:
        return None
    return (torch.tensor(rows, dtype=torch.int64, device=device), torch.tensor(cols, dtype=torch.int64, device=device),
            torch.tensor(values, dtype=torch.float32, device=device))


@dataclass(frozen=True)
class LogprobsTensors:
    """Per row: column 0 is the sampled token, columns 1..K the top-K by raw logprob."""

    token_ids: torch.Tensor  # [B, 1 + K] int64
    logprobs: torch.Tensor  # [B, 1 + K] fp32

    def tolists(self, num_logprobs: Sequence[int | None]) -> list[Logprobs | None]:
        """One dict per row (sampled token first, then its top num_logprobs[i]); None if not asked."""
        ids, lps = self.token_ids.tolist(), self.logprobs.tolist()
        result: list[Logprobs | None] = []
        for row_ids, row_lps, k in zip(ids, lps, num_logprobs):
            result.append(None if k is None else _as_dict(row_ids[: 1 + k], row_lps[: 1 + k]))
        return result


def _as_dict(ids: list[int], lps: list[float]) -> Logprobs:
    entry: Logprobs = {}
    for token_id, logprob in zip(ids, lps):
        entry.setdefault(token_id, logprob)
    return entry


def gather_logprobs(
    logprobs: torch.Tensor,  # [B, V] log-softmax
    token_ids: torch.Tensor,  # [B] int64, the token whose logprob comes first
    num_logprobs: int,
) -> LogprobsTensors:
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))
    if num_logprobs == 0:
        return LogprobsTensors(token_ids.unsqueeze(1), chosen)
    top = logprobs.topk(num_logprobs, dim=-1)  # sorted, largest first
    return LogprobsTensors(torch.cat([token_ids.unsqueeze(1), top.indices], 1), torch.cat([chosen, top.values], 1))


@dataclass(frozen=True)
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64
    logprobs: LogprobsTensors | None  # None when no row asked for logprobs


class Sampler(nn.Module):
    """logits [B, V] + SamplingMetadata -> SamplerOutput. Never modifies its input."""

    def forward(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        fused = _fused(logits, metadata)
        in_place = (metadata.penalties is not None or metadata.min_tokens_mask is not None
                    or metadata.logit_bias is not None or not fused)
        logits = logits.to(torch.float32, copy=in_place)  # [B, V]
        raw_logprobs = None if metadata.max_num_logprobs is None else torch.log_softmax(logits, dim=-1)
        if metadata.penalties is not None:
            lp.apply_penalties(logits, metadata.penalties)
        if metadata.logit_bias is not None:
            lp.apply_logit_bias(logits, *metadata.logit_bias)
        if metadata.min_tokens_mask is not None:
            lp.apply_token_mask(logits, *metadata.min_tokens_mask)
        sampled = self.sample(logits, metadata, fused)
        logprobs = None
        if raw_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, sampled, metadata.max_num_logprobs)
        return SamplerOutput(sampled, logprobs)

    @staticmethod
    def sample(logits: torch.Tensor, metadata: SamplingMetadata, fused: bool = False) -> torch.Tensor:
        """logits: [B, V] fp32 after penalties (modified in place unless `fused`). Returns [B] int64.

        fused: temperature, min-p, top-k and top-p in one kernel (llmctl_kernels/sampling.py, on CUDA):
        the same distribution without sorting the vocabulary (top-k's threshold is a topk)."""
        greedy = None if metadata.all_random else logits.argmax(dim=-1)
        if metadata.all_greedy:
            return greedy
        if fused:
            from llmctl_kernels.sampling import sample

            kth = None if metadata.top_k is None else lp.top_k_threshold(logits, metadata.top_k, metadata.max_top_k)
            sampled = sample(logits, metadata.temperature, _seeds(logits.shape[0], metadata.generators, logits.device),
                             metadata.min_p, None if kth is None else kth.view(-1), metadata.top_p)
        else:
            logits.div_(metadata.temperature.unsqueeze(1))
            if metadata.min_p is not None:
                lp.apply_min_p(logits, metadata.min_p)
            logits = lp.apply_top_k_top_p(logits, metadata.top_k, metadata.top_p, metadata.max_top_k)
            sampled = lp.random_sample(torch.softmax(logits, dim=-1), metadata.generators)
        return sampled if greedy is None else torch.where(metadata.is_greedy, greedy, sampled)


def _fused(logits: torch.Tensor, metadata: SamplingMetadata) -> bool:
    """Whether this batch samples with llmctl_kernels/sampling.py: on CUDA, where some row samples at
    random. Every such batch does, so a seeded row's tokens never depend on its neighbours."""
    return logits.is_cuda and not metadata.all_greedy


def _seeds(num_rows: int, generators: dict[int, torch.Generator], device: torch.device) -> torch.Tensor:
    """The fused sampler's Philox keys for one step: from the global generator, and for seeded
    rows from the row's own generator (which advances only when its row samples)."""
    seeds = torch.randint(0, 2**62, (num_rows,), device=device)
    for row, generator in generators.items():
        torch.randint(0, 2**62, (1,), generator=generator, device=device, out=seeds[row:row + 1])
    return seeds


def compute_prompt_logprobs(
    logits: torch.Tensor,  # [P, V]: row j is the model output at prompt position start + j
    prompt_token_ids: Sequence[int],
    num_logprobs: int,
    start: int = 0,
) -> list[Logprobs | None]:
    """Prompt logprobs for the positions these rows predict, as `RequestOutput.prompt_logprobs` holds them.

    Row j predicts prompt token start + j + 1; the row at the last prompt position predicts a
    generated token and is ignored. The entry for position 0 is None (nothing predicts it),
    so chunks computed at start = 0, c, 2c, ... concatenate to the whole prompt's list. One
    log-softmax over all P rows: the caller bounds P (the model runner passes chunks of 512
    rows, so the fp32 [P, V] peak stays bounded).
    """
    result: list[Logprobs | None] = [None] if start == 0 else []
    num_rows = min(logits.shape[0], len(prompt_token_ids) - 1 - start)
    if num_rows <= 0:
        return result
    logprobs = torch.log_softmax(logits[:num_rows].float(), dim=-1)
    targets = torch.tensor(prompt_token_ids[start + 1 : start + num_rows + 1], dtype=torch.int64, device=logits.device)
    result.extend(gather_logprobs(logprobs, targets, num_logprobs).tolists([num_logprobs] * num_rows))
    return result
