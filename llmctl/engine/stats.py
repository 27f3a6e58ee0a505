"""`EngineStats`, what `LLMEngine.get_stats` reports, and `StepCounters`, the engine's counters
behind it, recorded once per step (the scheduler and the block manager report the rest)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from llmctl.engine.block_manager import BlockManager
from llmctl.engine.scheduler import SchedulerOutput, SchedulerStats
from llmctl.engine.sequence import Sequence


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_preemptions: int
    kv_cache_usage: float  # fraction of blocks held by sequences
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_queries: int  # tokens
    prefix_cache_hits: int  # tokens
    num_prompt_tokens: int  # prompt tokens run through the model (cache hits excluded)
    num_generation_tokens: int
    num_steps: int
    num_partial_prefills: int  # prefill chunks that stopped short of the prompt's end (chunked prefill)
    max_num_running: int
    kv_waste: float  # now: share of allocated slots that hold no token
    kv_waste_mean: float  # mean over the steps that held blocks


class StepCounters:
    def __init__(self) -> None:
        self.num_prompt_tokens = self.num_generation_tokens = self.num_steps = self.max_num_running = 0
        self.num_partial_prefills = 0
        self.kv_waste = self.kv_waste_sum = 0.0
        self.kv_waste_steps = 0

    def record_schedule(self, out: SchedulerOutput, running: list[Sequence], block_manager: BlockManager,
                        requests: Mapping[int, object], now: float) -> None:
        """Count a scheduled step; `requests` (seq_id -> EngineRequest) get their first
        scheduled time."""
        self.num_steps += 1
        self.max_num_running = max(self.max_num_running, len(running))
        for e in out.scheduled:
            metrics = requests[e.seq.seq_id].metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
            if e.start_pos < e.seq.num_prompt_tokens:
                self.num_prompt_tokens += min(e.num_new_tokens, e.seq.num_prompt_tokens - e.start_pos)
            self.num_partial_prefills += not e.do_sample
        bs = block_manager.block_size
        allocated = (block_manager.num_blocks - block_manager.num_free_blocks) * bs
        if allocated:
            empty = sum(len(s.block_table) * bs - s.num_tokens for s in running)
            self.kv_waste = max(0, empty) / allocated
            self.kv_waste_sum += self.kv_waste
            self.kv_waste_steps += 1

    def stats(self, s: SchedulerStats, block_manager: BlockManager) -> EngineStats:
        return EngineStats(
            num_running=s.num_running, num_waiting=s.num_waiting, num_preemptions=s.num_preemptions,
            kv_cache_usage=s.kv_cache_usage, num_free_blocks=block_manager.num_free_blocks,
            num_total_blocks=block_manager.num_blocks, prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits, num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens, num_steps=self.num_steps,
            num_partial_prefills=self.num_partial_prefills, max_num_running=self.max_num_running,
            kv_waste=self.kv_waste, kv_waste_mean=self.kv_waste_sum / self.kv_waste_steps if self.kv_waste_steps else 0.0,
        )
