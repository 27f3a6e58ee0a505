"""Continuous batching: which sequences run each step, for how many tokens, and when they end.

One `schedule()` builds one batch under `max_num_seqs` and `max_num_batched_tokens`:
running decodes first (preempting the newest running sequence by recompute when KV
blocks run out), then the next chunk of partially prefilled prompts, then waiting
sequences as long as slots, tokens and blocks allow (iteration-level scheduling).
With `enable_chunked_prefill` a prompt larger than the token budget left is split
across steps while the decodes keep running in the same steps.

A request with n > 1 samples: the first sequence prefills the prompt; when its
prefill completes, the other n-1 are forked onto its blocks (ref counts, no copy)
and each runs the last prompt token once more to get its own logits; writing into
the shared last block is resolved by copy-on-write (`SchedulerOutput.blocks_to_copy`).

Usage, one engine step per loop (the engine serializes calls; this is not thread-safe):

    block_manager = BlockManager(num_blocks, cache_config.block_size, cache_config.enable_prefix_caching)
    scheduler = Scheduler(scheduler_config, block_manager, max_model_len, eos_token_id=tokenizer.eos_token_id)
    scheduler.add_request("req-0", prompt_token_ids, SamplingParams(n=2, max_tokens=32))
    while scheduler.has_unfinished_seqs():
        out = scheduler.schedule()
        # runner: copy K/V of every (src, dst) in out.blocks_to_copy, then run each
        # s in out.scheduled: s.token_ids at s.positions into s.slot_mapping(block_size),
        # and sample one token for each s with s.do_sample.
        sampled = runner.execute(out)  # aligned with out.scheduled; None where not do_sample
        for seq in scheduler.update_from_output(out, sampled):
            ...  # detokenize; on a stop string: scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED, stop)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence as SequenceLike
from dataclasses import dataclass, field

from llmctl.config import SchedulerConfig
from llmctl.engine.block_manager import BlockManager
from llmctl.engine.sequence import Sequence, SequenceStatus, create_sequence_group
from llmctl.engine.stop import token_stop
from llmctl.errors import CacheCapacityError, ConfigError, InvalidRequestError
from llmctl.sampling_params import SamplingParams, eos_token_ids


@dataclass(frozen=True)
class ScheduledSequence:
    """`num_new_tokens` tokens of `seq` starting at position `start_pos` run this step."""

    seq: Sequence
    start_pos: int  # = seq.num_computed_tokens when scheduled
    num_new_tokens: int
    do_sample: bool  # the chunk reaches the sequence's last token: sample one token from its logits

    # The views below read `seq` live: use them before `update_from_output`.
    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids[self.start_pos:self.start_pos + self.num_new_tokens]

    @property
    def positions(self) -> range:
        return range(self.start_pos, self.start_pos + self.num_new_tokens)

    def slot_mapping(self, block_size: int) -> list[int]:
        """KV cache slot (block_id * block_size + offset) of each new token."""
        table = self.seq.block_table
        return [table[p // block_size] * block_size + p % block_size for p in self.positions]


@dataclass
class SchedulerOutput:
    """One step's batch: decodes first, then prefill chunks, in this order."""

    scheduled: list[ScheduledSequence]
    blocks_to_copy: list[tuple[int, int]]  # (src_block, dst_block), to copy before the forward pass
    num_batched_tokens: int
    preempted_seq_ids: list[int] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_preemptions: int  # total since start
    kv_cache_usage: float  # fraction of blocks held by sequences
    prefix_cache_queries: int  # tokens
    prefix_cache_hits: int  # tokens


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, block_manager: BlockManager, max_model_len: int,
                 eos_token_id: int | SequenceLike[int] | None = None) -> None:
        capacity = block_manager.num_blocks * block_manager.block_size
        if max_model_len <= 0:
            raise ConfigError(f"max_model_len: must be positive, got {max_model_len}")
        if capacity < max_model_len:
            raise CacheCapacityError(
                f"the KV cache holds {capacity} tokens ({block_manager.num_blocks} blocks of "
                f"{block_manager.block_size}), fewer than max_model_len ({max_model_len})",
                hint=f"set max_model_len to at most {capacity} or give the KV cache more memory")
        if not scheduler_config.enable_chunked_prefill and scheduler_config.max_num_batched_tokens < max_model_len:
            raise ConfigError(
                f"max_num_batched_tokens: {scheduler_config.max_num_batched_tokens} is smaller than max_model_len "
                f"({max_model_len}) without chunked prefill, so a long prompt could never be scheduled")
        self.config = scheduler_config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.eos_token_ids = tuple(eos_token_ids(eos_token_id))  # every id that ends a sequence
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is the newest
        self._pending_children: dict[int, list[Sequence]] = {}  # prefilling seq_id -> samples to fork
        self._requests: dict[str, list[Sequence]] = {}
        self.num_preemptions = 0

    # ---- requests --------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                    arrival_time: float | None = None) -> list[Sequence]:
        """Queue a request; returns its `sampling_params.n` sequences (index 0..n-1)."""
        seqs = create_sequence_group(request_id, prompt_token_ids, sampling_params, arrival_time)
        self.add_sequence_group(seqs)
        return seqs

    def add_sequence(self, seq: Sequence) -> None:
        self.add_sequence_group([seq])

    def add_sequence_group(self, seqs: list[Sequence]) -> None:
        """Queue the samples of one request; `seqs[0]` prefills, the rest fork from it."""
        parent = seqs[0]
        if parent.request_id in self._requests:
            raise InvalidRequestError(f"request_id: {parent.request_id!r} is already being served")
        if parent.num_prompt_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt: {parent.num_prompt_tokens} tokens, more than max_model_len ({self.max_model_len})",
                hint="shorten the prompt or raise max_model_len")
        if len(seqs) > self.config.max_num_seqs:
            raise InvalidRequestError(f"n: {len(seqs)} samples exceed max_num_seqs ({self.config.max_num_seqs})")
        if any(s.request_id != parent.request_id or s.token_ids != parent.token_ids for s in seqs):
            raise InvalidRequestError("a sequence group must share one request_id and one prompt")
        self._requests[parent.request_id] = list(seqs)
        if len(seqs) > 1:
            self._pending_children[parent.seq_id] = list(seqs[1:])
        self.waiting.append(parent)

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every unfinished sequence of the request as aborted and free its blocks now.

        Safe while a step is in flight: `update_from_output` skips finished sequences.
        Returns the sequences it aborted (empty for an unknown or finished request).
        """
        aborted = [s for s in self._requests.get(request_id, []) if not s.is_finished]
        for seq in aborted:
            self.finish(seq, SequenceStatus.FINISHED_ABORTED)
        return aborted

    def finish(self, seq: Sequence, status: SequenceStatus = SequenceStatus.FINISHED_STOPPED,
               stop_reason: int | str | None = None) -> None:
        """End `seq` (e.g. on a stop string found by the detokenizer) and free its blocks."""
        if not status.is_finished:
            raise ValueError(f"finish: {status.name} is not a finished status")
        if seq.is_finished:
            return
        seq.status, seq.stop_reason = status, stop_reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        for children in self._pending_children.values():
            if seq in children:
                children.remove(seq)
        # Unforked samples of a parent that ends before its prefill do: they prefill on their own.
        for child in reversed(self._pending_children.pop(seq.seq_id, [])):
            self.waiting.appendleft(child)
        group = self._requests.get(seq.request_id, [])
        if all(s.is_finished for s in group):
            self._requests.pop(seq.request_id, None)

    # ---- one step --------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        scheduled: list[ScheduledSequence] = []
        preempted: list[int] = []
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_decodes(scheduled, preempted, budget)
        budget = self._schedule_prefill_chunks(scheduled, budget)
        if not preempted:  # memory is tight: admitting more would only be preempted again
            budget = self._schedule_waiting(scheduled, budget)
        return SchedulerOutput(
            scheduled=scheduled,
            blocks_to_copy=self.block_manager.take_blocks_to_copy(),
            num_batched_tokens=self.config.max_num_batched_tokens - budget,
            preempted_seq_ids=preempted,
        )

    def update_from_output(self, output: SchedulerOutput, sampled_token_ids: list[int | None]) -> list[Sequence]:
        """Advance the scheduled sequences past this step.

        `sampled_token_ids[i]` is the token sampled for `output.scheduled[i]`, ignored
        (may be None) where `do_sample` is False. Returns the sequences that got a new
        token this step, finished ones included.
        """
        if len(sampled_token_ids) != len(output.scheduled):
            raise ValueError(f"update_from_output: {len(sampled_token_ids)} sampled ids for "
                             f"{len(output.scheduled)} scheduled sequences")
        updated = []
        for entry, token_id in zip(output.scheduled, sampled_token_ids):
            seq = entry.seq
            if seq.is_finished:  # aborted while the step ran
                continue
            seq.num_computed_tokens += entry.num_new_tokens
            self.block_manager.cache_computed_blocks(seq)
            if not entry.do_sample:
                continue
            if token_id is None:
                raise ValueError(f"update_from_output: no sampled token for sequence {seq.seq_id}")
            self._fork_pending_children(seq)
            seq.append_token(int(token_id))
            self._check_stop(seq)
            updated.append(seq)
        return updated

    # ---- queries ---------------------------------------------------------------
    def has_unfinished_seqs(self) -> bool:
        return bool(self.waiting or self.running)

    def get_stats(self) -> SchedulerStats:
        bm = self.block_manager
        return SchedulerStats(
            num_running=len(self.running) + self._num_pending_running_children(),
            num_waiting=len(self.waiting) + sum(len(self._pending_children.get(s.seq_id, ())) for s in self.waiting),
            num_preemptions=self.num_preemptions,
            kv_cache_usage=bm.usage,
            prefix_cache_queries=bm.num_prefix_queries,
            prefix_cache_hits=bm.num_prefix_hits,
        )

    # ---- internals -------------------------------------------------------------
    def _schedule_decodes(self, scheduled: list[ScheduledSequence], preempted: list[int], budget: int) -> int:
        for seq in [s for s in self.running if s.num_uncomputed_tokens == 1]:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted for an older one
                continue
            while not self.block_manager.can_append(seq):
                # Scheduled ones precede `seq` in `running`, so the newest is never one of them.
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.seq_id)
                if victim is seq:
                    break
            else:
                self.block_manager.append_slot(seq)
                scheduled.append(self._entry(seq, 1))
                budget -= 1
        return budget

    def _schedule_prefill_chunks(self, scheduled: list[ScheduledSequence], budget: int) -> int:
        for seq in [s for s in self.running if s.num_uncomputed_tokens > 1]:
            if budget == 0:
                break
            num_new = min(seq.num_uncomputed_tokens, budget)
            if num_new < seq.num_uncomputed_tokens and not self.config.enable_chunked_prefill:
                continue
            # Its blocks were allocated whole at admission; this only guards the invariant.
            self.block_manager.append_slot(seq)
            scheduled.append(self._entry(seq, num_new))
            budget -= num_new
        return budget

    def _schedule_waiting(self, scheduled: list[ScheduledSequence], budget: int) -> int:
        bm = self.block_manager
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            num_slots = 1 + len(self._pending_children.get(seq.seq_id, ()))
            if len(self.running) + self._num_pending_running_children() + num_slots > self.config.max_num_seqs:
                break
            num_new = seq.num_tokens - bm.get_num_cached_tokens(seq)
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            if not bm.can_allocate(seq):
                break
            self.waiting.popleft()
            bm.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_new = min(seq.num_uncomputed_tokens, budget)
            scheduled.append(self._entry(seq, num_new))
            budget -= num_new
        return budget

    @staticmethod
    def _entry(seq: Sequence, num_new_tokens: int) -> ScheduledSequence:
        start = seq.num_computed_tokens
        return ScheduledSequence(seq, start, num_new_tokens, do_sample=start + num_new_tokens == seq.num_tokens)

    def _num_pending_running_children(self) -> int:
        return sum(len(self._pending_children.get(s.seq_id, ())) for s in self.running)

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption: drop its K/V; it re-prefills prompt + outputs later."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _fork_pending_children(self, parent: Sequence) -> None:
        for child in self._pending_children.pop(parent.seq_id, []):
            self.block_manager.fork(parent, child)
            child.status = SequenceStatus.RUNNING
            self.running.append(child)

    def _check_stop(self, seq: Sequence) -> None:
        params = seq.sampling_params
        limit = self.max_model_len - seq.num_prompt_tokens
        if params.max_tokens is not None:
            limit = min(limit, params.max_tokens)
        finish_reason, stop_reason = token_stop(params, seq.num_output_tokens, seq.last_token_id,
                                                self.eos_token_ids, limit)
        if finish_reason == "stop":
            self.finish(seq, SequenceStatus.FINISHED_STOPPED, stop_reason=stop_reason)
        elif finish_reason == "length":
            self.finish(seq, SequenceStatus.FINISHED_LENGTH_CAPPED)
