"""`Sequence`: one sample of one request, as the scheduler and the block manager see it.

A request asking for `n` samples becomes n sequences that share a `request_id`
(`index` 0..n-1) and, through the block manager's `fork`, the prompt's KV blocks.
"""

from __future__ import annotations

import enum
import itertools
import time

from llmctl.errors import InvalidRequestError
from llmctl.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED_STOPPED = enum.auto()  # eos, a stop token id or a stop string
    FINISHED_LENGTH_CAPPED = enum.auto()  # max_tokens or max_model_len
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI `finish_reason`: "stop", "length", "abort", or None while unfinished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH_CAPPED: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}

_seq_ids = itertools.count()


class Sequence:
    """Token ids (prompt then output) and the KV bookkeeping of one sample.

    `num_computed_tokens` counts the leading tokens whose K/V are in the cache; the
    tokens still to run are `token_ids[num_computed_tokens:]` (the whole prompt at
    first, one token per decode step after). `block_table[i]` is the KV block holding
    tokens i*block_size .. (i+1)*block_size-1. Only the block manager writes
    `block_table`, `block_hashes` and `num_cached_tokens`.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams | None = None,
        index: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        if len(prompt_token_ids) == 0:
            raise InvalidRequestError(f"prompt_token_ids: request {request_id!r} has an empty prompt")
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index
        self.sampling_params = sampling_params if sampling_params is not None else SamplingParams()
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first admission
        self.block_table: list[int] = []
        # Chained hashes of the full blocks of token_ids; content-only, so they stay
        # valid across preemption (filled lazily by the block manager).
        self.block_hashes: list[bytes] = []
        self.status = SequenceStatus.WAITING
        self.stop_reason: int | str | None = None  # the stop token id or stop string that ended it
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.num_preemptions = 0

    def __repr__(self) -> str:
        return (f"Sequence(seq_id={self.seq_id}, request_id={self.request_id!r}, index={self.index}, "
                f"num_tokens={self.num_tokens}, num_computed_tokens={self.num_computed_tokens}, "
                f"status={self.status.name})")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose K/V are not in the cache yet: what the next step(s) must run."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def reads_prefix_cache(self) -> bool:
        """Prompt logprobs need the logits of every prompt position, which a prefix-cache hit
        skips: such a sequence runs its whole prompt (vLLM does the same), so no dense
        recompute outside the step's memory budget is ever needed."""
        return self.sampling_params.prompt_logprobs is None

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)


def create_sequence_group(
    request_id: str,
    prompt_token_ids: list[int],
    sampling_params: SamplingParams,
    arrival_time: float | None = None,
) -> list[Sequence]:
    """The `sampling_params.n` sequences of one request; the first is the one that prefills."""
    arrival_time = time.time() if arrival_time is None else arrival_time
    return [Sequence(request_id, prompt_token_ids, sampling_params, index=i, arrival_time=arrival_time)
            for i in range(sampling_params.n)]
