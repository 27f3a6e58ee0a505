"""`EngineRequest`: what the engine keeps per request beside the scheduler's sequences:
per-sample detokenizers, generators, logprobs, the prompt's logprobs and timings; and
how it turns them into the cumulative `RequestOutput` of each step. `step_state`: what of
them a step passes to the model runner."""

from __future__ import annotations

from typing import Mapping

import torch

from llmctl.engine.detokenizer import IncrementalDetokenizer
from llmctl.engine.outputs import CompletionOutput, Logprobs, RequestMetrics, RequestOutput
from llmctl.engine.scoring import PromptScorer, score_dense
from llmctl.engine.sequence import Sequence, SequenceStatus
from llmctl.layers.sampler import make_generator


class EngineRequest:
    def __init__(self, request_id: str, prompt: str | None, seqs: list[Sequence], tokenizer,
                 device: torch.device, arrival_time: float, scorer: PromptScorer | None = None,
                 score_from: int = 1) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.seqs = seqs
        self.params = params = seqs[0].sampling_params
        self.metrics = RequestMetrics(arrival_time=arrival_time)
        # The prompt's last tokens open each decode window: a SentencePiece "▁Paris" then reads " Paris".
        self.detokenizers = ({s.seq_id: IncrementalDetokenizer(tokenizer, params, s.prompt_token_ids) for s in seqs}
                             if tokenizer else {})
        self.logprobs: dict[int, list[Logprobs]] | None = (
            {s.seq_id: [] for s in seqs} if params.logprobs is not None else None)
        self.cumulative_logprob = {s.seq_id: 0.0 for s in seqs}
        # Seeded samples own a generator for life, so their tokens ignore the rest of the batch.
        self.generators = ({s.seq_id: make_generator(params.sample_seed(s.index), device) for s in seqs}
                           if params.seed is not None and not params.greedy else {})
        # Index k holds the logprobs of prompt token k (k = 0: None, nothing predicts it).
        self.prompt_logprobs: list[Logprobs | None] | None = [] if params.prompt_logprobs is not None else None
        self.error: Exception | None = None  # why the engine failed it, if it did
        # Prompt scoring (llmctl.engine.scoring): the scorer's chunk results, and the next prompt
        # position to score (positions before it are done, or were never asked for).
        self.scorer = scorer
        self.score_next = score_from
        self.prompt_scores: list[dict] = []

    @property
    def has_step_state(self) -> bool:
        """Whether a step passes anything of this request to the runner beyond its sequences:
        generators, missing prompt logprobs or a scorer."""
        return bool(self.generators) or self.prompt_logprobs is not None or self.scorer is not None

    def scoring_from(self, seq: Sequence) -> int | None:
        """The first prompt token still to score; None when there is no scorer or nothing left."""
        if self.scorer is None or self.score_next >= seq.num_prompt_tokens:
            return None
        return self.score_next

    def add_prompt_scores(self, chunks: list[dict], next_pos: int) -> None:
        self.prompt_scores.extend(chunks)
        self.score_next = next_pos

    def prompt_logprobs_missing_from(self, seq: Sequence) -> int | None:
        """The first prompt position whose prediction is not recorded; None when complete."""
        if self.prompt_logprobs is None or len(self.prompt_logprobs) >= seq.num_prompt_tokens:
            return None
        return max(0, len(self.prompt_logprobs) - 1)

    def add_prompt_logprobs(self, chunk: list[Logprobs | None]) -> None:
        if self.prompt_logprobs is not None:
            self.prompt_logprobs.extend(chunk)

    def on_token(self, seq: Sequence, logprobs: Logprobs | None, now: float) -> str | None:
        """Record `seq`'s newest token; return a stop string if its text now contains one."""
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = now
        token_id = seq.last_token_id
        if logprobs is not None:
            self.cumulative_logprob[seq.seq_id] += logprobs[token_id]
            if self.logprobs is not None:
                self.logprobs[seq.seq_id].append(logprobs)
        detok = self.detokenizers.get(seq.seq_id)
        if detok is None:
            return None
        # The scheduler ends a sequence with FINISHED_STOPPED only on EOS or a stop token id.
        stop_terminated = seq.status is SequenceStatus.FINISHED_STOPPED
        return detok.update([token_id], stop_terminated=stop_terminated)

    @staticmethod
    def mark_stopped_by_string(seq: Sequence, stop_str: str) -> None:
        # A stop string on the token that also hit max_tokens still reports "stop", as vLLM does.
        seq.status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, stop_str

    def _text(self, seq: Sequence) -> str:
        detok = self.detokenizers.get(seq.seq_id)
        return "" if detok is None else detok.get_next_output_text(finished=seq.is_finished, delta=False)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def make_output(self, now: float) -> RequestOutput:
        finished = self.finished
        if finished and self.metrics.finished_time is None:
            self.metrics.finished_time = now
        self.metrics.num_preemptions = sum(s.num_preemptions for s in self.seqs)
        outputs = [
            CompletionOutput(
                index=s.index, text=self._text(s), token_ids=s.output_token_ids,
                finish_reason=s.finish_reason, stop_reason=s.stop_reason,
                logprobs=list(self.logprobs[s.seq_id]) if self.logprobs is not None else None,
                cumulative_logprob=self.cumulative_logprob[s.seq_id],
            )
            for s in self.seqs
        ]
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.seqs[0].prompt_token_ids,
            outputs=outputs, finished=finished, metrics=self.metrics,
            prompt_logprobs=list(self.prompt_logprobs) if self.prompt_logprobs is not None else None,
            num_cached_tokens=self.seqs[0].num_cached_tokens, error=self.error,
            prompt_scores=self.prompt_scores if self.scorer is not None else None,
        )


def step_state(out, requests: Mapping[int, EngineRequest], model, device: torch.device
               ) -> tuple[dict, dict, dict]:
    """What the step `out` (a SchedulerOutput) passes to the runner beyond its sequences, each
    by seq_id: the generator of a seeded sample, the first prompt position whose logprobs are
    missing, and (scorer, first prompt token to score). Prompt tokens a scorer has not seen that
    the prefix cache served are scored now, by a dense forward of `model`."""
    generators, prompt_lp_from, scorers = {}, {}, {}
    for e in out.scheduled:
        seq = e.seq
        request = requests[seq.seq_id]
        gen = request.generators.get(seq.seq_id)
        if gen is not None:
            generators[seq.seq_id] = gen
        first = request.prompt_logprobs_missing_from(seq)
        if first is not None:
            # A sequence with prompt logprobs never reads the prefix cache
            # (Sequence.reads_prefix_cache), so every missing position runs in a step.
            assert first >= e.start_pos, (first, e.start_pos)
            prompt_lp_from[seq.seq_id] = first
        first = request.scoring_from(seq)
        if first is None:
            continue
        if first - 1 < e.start_pos:  # the prefix cache served positions nobody scored yet
            chunks = score_dense(model, device, seq.prompt_token_ids, first, e.start_pos + 1, request.scorer)
            request.add_prompt_scores(chunks, e.start_pos + 1)
            first = e.start_pos + 1
        scorers[seq.seq_id] = (request.scorer, first)
    return generators, prompt_lp_from, scorers

