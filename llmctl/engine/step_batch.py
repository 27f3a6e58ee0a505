"""`StepBatch`: what the model runner needs of one scheduled step, as plain arrays.

The scheduler's `SchedulerOutput` holds live `Sequence` objects; the runner never reads
them. One pass over the scheduled entries (decodes first, then prefill chunks) flattens them:

    input_ids      [T]          the new tokens in batch order
    start_pos      [B]          first position each sequence computes this step
    num_new_tokens [B]          tokens each sequence computes (1 for a decode)
    block_tables   [B, W]       padded with block 0 (entries past a sequence's blocks are never read)
    blocks_to_copy [C, 2]       (src, dst) copy-on-write before the forward
    logits_rows    [R]          hidden rows whose logits are needed: the sampling rows first
                                (one per sampling sequence), then every prompt-logprob row
    and two flags: decode_only (a decode graph may replay it) and has_prompt_logprobs (a prefill
    graph may not: it computes the sampling rows' logits only)

Under tensor parallelism rank 0 broadcasts exactly these arrays (`to_wire`/`from_wire`);
the sampling requests and prompt-logprob spans stay on rank 0, which alone samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from llmctl.layers.sampler import SamplingRequest, reads_token_history

KIND_STEP = 1  # a scheduled step over the paged cache (the channel's other commands: engine.distributed)


@dataclass(frozen=True)
class PromptSpan:
    """Prompt logprobs of positions lo..lo+num_rows-1 of one sequence come from
    logits_rows[first_row:first_row + num_rows]."""

    seq_id: int
    prompt_token_ids: Sequence[int]
    num_logprobs: int
    lo: int
    first_row: int
    num_rows: int


@dataclass(frozen=True)
class ScoreSpan:
    """A scoring request's prompt tokens lo..lo+num_rows-1 are predicted by
    logits_rows[first_row:first_row + num_rows] (llmctl.engine.scoring)."""

    seq_id: int
    prompt_token_ids: Sequence[int]
    scorer: object  # PromptScorer
    lo: int
    first_row: int
    num_rows: int


@dataclass
class StepBatch:
    input_ids: list[int]
    start_pos: list[int]
    num_new_tokens: list[int]
    block_tables: list[list[int]]
    blocks_to_copy: list[tuple[int, int]]
    logits_rows: list[int]
    num_sample_rows: int  # logits_rows[:num_sample_rows] sample, in entry order
    decode_only: bool  # every entry adds one generated token and samples (a graph may replay it)
    has_prompt_logprobs: bool = False  # some entry scores prompt positions (no prefill graph then)
    kind: int = KIND_STEP
    # rank 0 only (never sent): entry index of each sampling row, its sampling request, prompt spans
    sample_entries: list[int] = field(default_factory=list)
    sampling: list[SamplingRequest] = field(default_factory=list)
    prompt_spans: list[PromptSpan] = field(default_factory=list)
    score_spans: list[ScoreSpan] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return len(self.start_pos)


def build_step_batch(out, generators: Mapping[int, object], prompt_logprobs_from: Mapping[int, int],
                     prompt_scorers: Mapping[int, tuple[object, int]] | None = None) -> StepBatch:
    """The `StepBatch` of a `SchedulerOutput`. `generators`: seq_id -> generator of seeded
    sequences; `prompt_logprobs_from`: seq_id -> first prompt position whose logprobs are missing;
    `prompt_scorers`: seq_id -> (scorer, first prompt token it has not scored)."""
    token_ids: list[int] = []
    starts, lens, tables, rows, sample_entries, sampling = [], [], [], [], [], []
    spans: list[PromptSpan] = []
    scores: list[ScoreSpan | None] = []
    get_generator = generators.get if generators else None
    decode_only = True
    end = 0
    for i, e in enumerate(out.scheduled):
        seq, start, n = e.seq, e.start_pos, e.num_new_tokens
        if n == 1:
            token_ids.append(seq.token_ids[start])
        else:
            token_ids.extend(seq.token_ids[start:start + n])
            decode_only = False
        end += n
        starts.append(start)
        lens.append(n)
        tables.append(seq.block_table)
        if e.do_sample:
            rows.append(end - 1)
            sample_entries.append(i)
            params = seq.sampling_params
            generator = get_generator(seq.seq_id) if get_generator else None
            if reads_token_history(params):
                sampling.append((params, seq.prompt_token_ids, seq.output_token_ids, generator))
            else:  # no copy of the token lists for a row that never reads them
                sampling.append((params, (), (), generator))
        else:
            decode_only = False
        if prompt_logprobs_from and seq.seq_id in prompt_logprobs_from:
            spans.append(_prompt_span(seq, start, n, end, prompt_logprobs_from[seq.seq_id]))
        if prompt_scorers and seq.seq_id in prompt_scorers:
            scores.append(_score_span(seq, start, n, end, *prompt_scorers[seq.seq_id]))
        if decode_only and start < seq.num_prompt_tokens:
            decode_only = False  # a prompt's last token, recomputed (n > 1 samples, preemption)
    if spans:
        spans = _place_spans(spans, rows)
    if scores:
        scores = _place_score_spans(scores, rows)
    width = max(len(t) for t in tables)
    padded = [t + [0] * (width - len(t)) for t in tables]
    return StepBatch(token_ids, starts, lens, padded, list(out.blocks_to_copy), rows, len(sample_entries),
                     decode_only, bool(prompt_logprobs_from) or bool(scores), KIND_STEP, sample_entries, sampling,
                     spans, scores)


def _score_span(seq, start: int, n: int, end: int, scorer, first: int) -> ScoreSpan | None:
    """Prompt tokens lo..hi-1 not yet scored that this chunk predicts (token t from the hidden
    row of position t - 1); first_row holds that row until `_place_score_spans`."""
    lo = max(first, start + 1)
    hi = min(start + n + 1, seq.num_prompt_tokens)
    if hi <= lo:
        return None
    row0 = end - n - start  # hidden row of position 0
    return ScoreSpan(seq.seq_id, seq.prompt_token_ids, scorer, lo, row0 + lo - 1, hi - lo)


def _place_score_spans(spans: list[ScoreSpan | None], rows: list[int]) -> list[ScoreSpan]:
    placed = []
    for span in spans:
        if span is not None:
            placed.append(ScoreSpan(span.seq_id, span.prompt_token_ids, span.scorer, span.lo, len(rows),
                                    span.num_rows))
            rows.extend(range(span.first_row, span.first_row + span.num_rows))
    return placed


def _prompt_span(seq, start: int, n: int, end: int, first: int) -> PromptSpan | None:
    """Positions lo..hi-1 not yet scored that this chunk computes; first_row holds the hidden
    row of lo until `_place_spans` turns it into an index into logits_rows."""
    lo = max(start, first)
    hi = min(start + n, seq.num_prompt_tokens - 1)
    if hi <= lo and not (lo == 0 and seq.num_prompt_tokens == 1):
        return None
    row0 = end - n - start  # hidden row of position 0
    return PromptSpan(seq.seq_id, seq.prompt_token_ids, seq.sampling_params.prompt_logprobs, lo, row0 + lo,
                      max(0, hi - lo))


def _place_spans(spans: list[PromptSpan | None], rows: list[int]) -> list[PromptSpan]:
    placed = []
    for span in spans:
        if span is None:
            continue
        placed.append(PromptSpan(span.seq_id, span.prompt_token_ids, span.num_logprobs, span.lo, len(rows),
                                 span.num_rows))
        rows.extend(range(span.first_row, span.first_row + span.num_rows))
    return placed


# ---- the wire form: one int64 header and one int64 payload ---------------------------------
HEADER_LEN = 9


def to_wire(batch: StepBatch) -> tuple[list[int], list[int]]:
    """(header, payload) of the arrays the other ranks need."""
    width = len(batch.block_tables[0]) if batch.block_tables else 0
    header = [batch.kind, len(batch.input_ids), batch.num_seqs, width, len(batch.blocks_to_copy),
              len(batch.logits_rows), int(batch.decode_only), batch.num_sample_rows, int(batch.has_prompt_logprobs)]
    payload = [*batch.input_ids, *batch.start_pos, *batch.num_new_tokens,
               *(b for row in batch.block_tables for b in row),
               *(b for pair in batch.blocks_to_copy for b in pair), *batch.logits_rows]
    return header, payload


def from_wire(header: Sequence[int], payload: Sequence[int]) -> StepBatch:
    kind, t, b, w, c, r, decode_only, num_sample_rows, prompt_logprobs = (int(x) for x in header)
    values = list(payload)
    o = 0

    def take(n: int) -> list[int]:
        nonlocal o
        o += n
        return values[o - n:o]

    ids, starts, lens, flat_tables, copies, rows = take(t), take(b), take(b), take(b * w), take(2 * c), take(r)
    tables = [flat_tables[i * w:(i + 1) * w] for i in range(b)]
    pairs = [(copies[2 * i], copies[2 * i + 1]) for i in range(c)]
    return StepBatch(ids, starts, lens, tables, pairs, rows, num_sample_rows, bool(decode_only),
                     bool(prompt_logprobs), kind)
