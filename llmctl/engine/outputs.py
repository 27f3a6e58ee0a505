"""What the engine hands back for each request after each step."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmctl.sampling_params import Logprobs


@dataclass
class CompletionOutput:
    """One of the n samples of a request, as of the latest step (cumulative)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # None while running; "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    logprobs: list[Logprobs] | None = None
    cumulative_logprob: float = 0.0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock times (time.time()) of the request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    prompt_logprobs: list[Logprobs | None] | None = None  # first position has none
    num_cached_tokens: int = 0
    # A scoring request's PromptScorer results, one dict of tensors per chunk (llmctl.engine.scoring)
    prompt_scores: list[dict] | None = None
    extra: dict = field(default_factory=dict)
    # Set when the engine failed this request inside a step (finish_reason "abort"); the
    # server answers with it, the offline API raises it.
    error: Exception | None = None
