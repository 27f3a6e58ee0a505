"""Scheduler on tiny specs (block_size 4, 10 blocks), driven with fake sampled token ids.

`FakeKVRunner` stands in for the model: each KV slot stores the token prefix that
produced it, so every step checks that a sequence's block table really holds its
history (prefix hits, forks, copy-on-write copies, recompute after preemption).
"""

from __future__ import annotations

import random

import pytest

from llmctl.config import SchedulerConfig
from llmctl.engine.block_manager import BlockManager
from llmctl.engine.scheduler import Scheduler, SchedulerOutput
from llmctl.engine.sequence import Sequence, SequenceStatus
from llmctl.errors import CacheCapacityError, ConfigError, InvalidRequestError
from llmctl.sampling_params import SamplingParams

BLOCK_SIZE = 4
EOS = 2


def make(num_blocks: int = 10, max_num_seqs: int = 4, max_num_batched_tokens: int = 16,
         chunked: bool = True, max_model_len: int = 40, prefix: bool = True) -> Scheduler:
    bm = BlockManager(num_blocks, BLOCK_SIZE, prefix)
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                             enable_chunked_prefill=chunked)
    return Scheduler(config, bm, max_model_len, eos_token_id=EOS)


def params(**kw) -> SamplingParams:
    kw.setdefault("max_tokens", 4)
    return SamplingParams(**kw)


class FakeKVRunner:
    """Executes a SchedulerOutput against a fake KV cache and samples `sample(seq)`."""

    def __init__(self, sched: Scheduler, sample=lambda seq: 100 + seq.index) -> None:
        self.sched = sched
        self.sample = sample
        self.slots: dict[int, tuple[int, ...]] = {}
        self.outputs: list[SchedulerOutput] = []
        self.slot_mappings: list[list[list[int]]] = []  # per step, per scheduled sequence

    def step(self) -> SchedulerOutput:
        sched, bs = self.sched, self.sched.block_manager.block_size
        out = sched.schedule()
        self.outputs.append(out)
        assert out.num_batched_tokens == sum(e.num_new_tokens for e in out.scheduled)
        assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
        assert len(out.scheduled) <= sched.config.max_num_seqs
        for src, dst in out.blocks_to_copy:
            for off in range(bs):
                if src * bs + off in self.slots:
                    self.slots[dst * bs + off] = self.slots[src * bs + off]
        written: dict[int, tuple[int, ...]] = {}
        self.slot_mappings.append([e.slot_mapping(bs) for e in out.scheduled])
        for e in out.scheduled:
            assert e.num_new_tokens >= 1 and e.start_pos == e.seq.num_computed_tokens
            for pos, slot in zip(e.positions, e.slot_mapping(bs)):
                prefix = tuple(e.seq.token_ids[: pos + 1])
                assert written.setdefault(slot, prefix) == prefix, "two different writes to one slot"
                self.slots[slot] = prefix
        for e in out.scheduled:  # attention reads the whole context after this step's writes
            table = e.seq.block_table
            for pos in range(e.start_pos + e.num_new_tokens):
                assert self.slots.get(table[pos // bs] * bs + pos % bs) == tuple(e.seq.token_ids[: pos + 1])
        sampled = [self.sample(e.seq) if e.do_sample else None for e in out.scheduled]
        sched.update_from_output(out, sampled)
        return out

    def run(self, max_steps: int = 200) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished_seqs():
                return
            self.step()
        raise AssertionError("did not finish")


def shape(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    """(request_id/index, start_pos, num_new_tokens) of each scheduled sequence, in batch order."""
    return [(f"{e.seq.request_id}/{e.seq.index}", e.start_pos, e.num_new_tokens) for e in out.scheduled]


def assert_idle(sched: Scheduler) -> None:
    bm = sched.block_manager
    assert not sched.has_unfinished_seqs()
    assert bm.num_free_blocks == bm.num_blocks
    assert all(block.ref_count == 0 for block in bm.blocks)
    assert sched.get_stats().kv_cache_usage == 0.0
    # No bookkeeping outlives its sequences (a long-running server would leak it).
    assert not sched._requests and not sched._pending_children and not bm._num_offered


def test_single_request_prefill_then_decodes_until_max_tokens():
    sched = make()
    (seq,) = sched.add_request("a", list(range(10, 16)), params(max_tokens=4))
    runner = FakeKVRunner(sched)
    out = runner.step()
    assert shape(out) == [("a/0", 0, 6)] and out.scheduled[0].do_sample
    assert seq.block_table == [0, 1] and seq.token_ids[-1] == 100
    assert shape(runner.step()) == [("a/0", 6, 1)]
    out = runner.step()
    assert shape(out) == [("a/0", 7, 1)] and out.scheduled[0].slot_mapping(BLOCK_SIZE) == [7]
    out = runner.step()  # position 8 opens a third block
    assert shape(out) == [("a/0", 8, 1)] and runner.slot_mappings[-1] == [[2 * BLOCK_SIZE]]
    assert seq.is_finished and seq.finish_reason == "length" and seq.output_token_ids == [100] * 4
    assert_idle(sched)


@pytest.mark.parametrize(
    ("sp", "outputs", "reason", "stop_reason"),
    [
        (params(max_tokens=8), [5, EOS], "stop", None),
        (params(max_tokens=8, ignore_eos=True), [5, EOS, 6, EOS, 7, 8, 9, 10], "length", None),
        (params(max_tokens=8, min_tokens=3), [5, EOS, 6, EOS], "stop", None),
        (params(max_tokens=8, stop_token_ids=[7]), [5, 6, 7], "stop", 7),
        (params(max_tokens=8, stop_token_ids=[5], min_tokens=2), [5, 6, 5], "stop", 5),
        (params(max_tokens=None), [5] * 34, "length", None),  # 6 + 34 = max_model_len 40
    ],
)
def test_stop_conditions(sp, outputs, reason, stop_reason):
    sched = make()
    (seq,) = sched.add_request("a", list(range(10, 16)), sp)
    script = iter(outputs + [11] * 40)  # what a sampler would go on producing past a missed stop
    FakeKVRunner(sched, sample=lambda s: next(script)).run()
    assert seq.output_token_ids == outputs
    assert (seq.finish_reason, seq.stop_reason) == (reason, stop_reason)
    assert_idle(sched)


def test_finish_on_a_stop_string_frees_blocks():
    sched = make()
    (seq,) = sched.add_request("a", list(range(6)), params(max_tokens=10))
    runner = FakeKVRunner(sched)
    runner.step()
    sched.finish(seq, SequenceStatus.FINISHED_STOPPED, stop_reason="###")
    assert (seq.finish_reason, seq.stop_reason) == ("stop", "###")
    assert_idle(sched)


def test_prompt_longer_than_max_model_len_is_rejected():
    sched = make(max_model_len=20)
    with pytest.raises(InvalidRequestError, match=r"21 tokens.*max_model_len \(20\)"):
        sched.add_request("long", list(range(21)), params())
    sched.add_request("fits", list(range(20)), params())  # exactly max_model_len: one token, then length
    FakeKVRunner(sched).run()
    assert_idle(sched)


def test_bad_configurations_are_rejected():
    with pytest.raises(CacheCapacityError, match="40 tokens.*max_model_len \\(41\\)"):
        make(max_model_len=41)
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        make(chunked=False, max_num_batched_tokens=16, max_model_len=40)
    sched = make(max_num_seqs=2)
    with pytest.raises(InvalidRequestError, match="max_num_seqs"):
        sched.add_request("wide", [1, 2, 3], params(n=3))
    (dup,) = sched.add_request("dup", [1, 2, 3], params())
    with pytest.raises(InvalidRequestError, match="dup"):
        sched.add_request("dup", [1, 2, 3], params())
    assert sched.abort("dup") == [dup]
    assert_idle(sched)


def test_chunked_prefill_splits_a_long_prompt_while_decodes_continue():
    sched = make(max_num_batched_tokens=8)
    sched.add_request("d", [1, 3, 4], params(max_tokens=5))
    runner = FakeKVRunner(sched)
    assert shape(runner.step()) == [("d/0", 0, 3)]
    (long,) = sched.add_request("p", list(range(10, 30)), params(max_tokens=1))
    steps = [shape(runner.step()) for _ in range(4)]
    assert steps == [
        [("d/0", 3, 1), ("p/0", 0, 7)],
        [("d/0", 4, 1), ("p/0", 7, 7)],
        [("d/0", 5, 1), ("p/0", 14, 6)],
        [("d/0", 6, 1)],
    ]
    assert [e.do_sample for e in runner.outputs[-2].scheduled] == [True, True]
    assert [e.do_sample for e in runner.outputs[-3].scheduled] == [True, False]
    assert long.output_token_ids == [100] and long.finish_reason == "length"
    runner.run()
    assert_idle(sched)


def test_without_chunked_prefill_a_prompt_waits_for_a_step_with_room():
    sched = make(max_num_batched_tokens=40, chunked=False)
    sched.add_request("a", list(range(30)), params(max_tokens=3))
    sched.add_request("b", list(range(100, 120)), params(max_tokens=1))
    runner = FakeKVRunner(sched)
    assert shape(runner.step()) == [("a/0", 0, 30)]  # b (20) does not fit the 10 tokens left
    assert shape(runner.step()) == [("a/0", 30, 1)]  # b's 5 blocks do not fit the 2 left
    runner.run()
    assert [s for o in runner.outputs for s in shape(o) if s[0] == "b/0"] == [("b/0", 0, 20)]
    assert_idle(sched)


def test_max_num_seqs_admits_the_next_request_when_one_finishes():
    sched = make(max_num_seqs=2, max_num_batched_tokens=32)
    for rid, max_tokens in (("a", 1), ("b", 3), ("c", 2)):
        sched.add_request(rid, [5, 6, 7], params(max_tokens=max_tokens))
    runner = FakeKVRunner(sched)
    assert shape(runner.step()) == [("a/0", 0, 3), ("b/0", 0, 3)]  # a finishes here
    assert shape(runner.step()) == [("b/0", 3, 1), ("c/0", 0, 3)]
    assert sched.get_stats().num_running == 2
    runner.run()
    assert_idle(sched)


def test_token_budget_bounds_admission_with_chunking():
    sched = make(max_num_batched_tokens=5, max_num_seqs=4)
    for rid in "abc":
        sched.add_request(rid, [7, 8, 9], params(max_tokens=2))
    runner = FakeKVRunner(sched)
    assert shape(runner.step()) == [("a/0", 0, 3), ("b/0", 0, 2)]
    assert shape(runner.step()) == [("a/0", 3, 1), ("b/0", 2, 1), ("c/0", 0, 3)]
    runner.run()
    assert_idle(sched)


def test_prefix_cache_hit_across_requests():
    sched = make()
    shared = list(range(50, 58))
    sched.add_request("a", shared + [1, 3], params(max_tokens=1))
    runner = FakeKVRunner(sched)
    runner.run()
    (b,) = sched.add_request("b", shared + [9], params(max_tokens=2))
    assert shape(runner.step()) == [("b/0", 8, 1)]
    assert b.num_cached_tokens == 8 and b.block_table[:2] == [0, 1]
    stats = sched.get_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (10 + 9, 8)
    runner.run()
    assert_idle(sched)


def test_n_samples_share_the_prompt_and_copy_on_write_the_last_block():
    sched = make()
    seqs = sched.add_request("r", list(range(10, 16)), params(n=3, max_tokens=3))
    runner = FakeKVRunner(sched)
    out = runner.step()
    assert shape(out) == [("r/0", 0, 6)]  # the prompt runs once
    assert [s.block_table for s in seqs] == [[0, 1]] * 3
    assert [b.ref_count for b in sched.block_manager.blocks[:2]] == [3, 3]
    out = runner.step()
    # The parent writes position 6 and each child reruns position 5, all into shared block 1.
    assert shape(out) == [("r/0", 6, 1), ("r/1", 5, 1), ("r/2", 5, 1)]
    assert out.blocks_to_copy == [(1, 2), (1, 3)]
    assert [s.block_table for s in seqs] == [[0, 2], [0, 3], [0, 1]]
    runner.run()
    assert [s.output_token_ids for s in seqs] == [[100] * 3, [101] * 3, [102] * 3]
    assert_idle(sched)


def test_n_samples_with_a_block_aligned_prompt():
    sched = make()
    seqs = sched.add_request("r", list(range(10, 18)), params(n=2, max_tokens=3))
    runner = FakeKVRunner(sched)
    runner.step()
    out = runner.step()
    assert shape(out) == [("r/0", 8, 1), ("r/1", 7, 1)]
    assert out.blocks_to_copy == [(1, 3)]  # the parent moved on to a new block 2
    assert [s.block_table for s in seqs] == [[0, 1, 2], [0, 3]]
    runner.run()
    assert_idle(sched)


def test_a_group_reserves_its_slots_under_max_num_seqs():
    sched = make(max_num_seqs=3)
    sched.add_request("g", [4, 5, 6], params(n=2, max_tokens=2))
    sched.add_request("x", [7, 8], params(max_tokens=2))
    sched.add_request("y", [9, 10], params(max_tokens=1))
    runner = FakeKVRunner(sched)
    assert shape(runner.step()) == [("g/0", 0, 3), ("x/0", 0, 2)]  # y would be the 4th
    assert sched.get_stats().num_running == 3
    runner.run()
    assert_idle(sched)


def test_preemption_evicts_the_newest_and_it_resumes_later():
    sched = make(max_num_batched_tokens=32)
    a_seq = sched.add_request("a", list(range(16)), params(max_tokens=8))[0]
    (b_seq,) = sched.add_request("b", list(range(100, 116)), params(max_tokens=8))
    runner = FakeKVRunner(sched)
    assert shape(runner.step()) == [("a/0", 0, 16), ("b/0", 0, 16)]  # 8 of 10 blocks
    for _ in range(4):  # positions 16..19: each takes its 5th block at position 16
        runner.step()
    assert sched.block_manager.num_free_blocks == 0
    out = runner.step()  # position 20 needs a 6th block each: b, the newest, is preempted
    assert out.preempted_seq_ids == [b_seq.seq_id] and shape(out) == [("a/0", 20, 1)]
    assert b_seq.status is SequenceStatus.WAITING and sched.waiting[0] is b_seq
    assert b_seq.num_computed_tokens == 0 and b_seq.block_table == []
    assert b_seq.num_preemptions == 1 and sched.get_stats().num_preemptions == 1
    assert b_seq.output_token_ids == [100] * 5  # kept: recompute re-prefills prompt + outputs
    runner.run()
    resumed = [s for o in runner.outputs[6:] for s in shape(o) if s[0] == "b/0"]
    assert resumed[0] == ("b/0", 16, 5)  # 4 of its blocks were still cached; position 16.. reruns
    assert a_seq.finish_reason == b_seq.finish_reason == "length"
    assert b_seq.output_token_ids == [100] * 8
    assert_idle(sched)


def test_preempted_sequence_goes_ahead_of_older_waiting_requests():
    sched = make(max_num_batched_tokens=32, max_num_seqs=2)
    sched.add_request("a", list(range(16)), params(max_tokens=8))
    (b_seq,) = sched.add_request("b", list(range(100, 116)), params(max_tokens=8))
    (c_seq,) = sched.add_request("c", [7, 7, 7], params(max_tokens=1))  # waits: max_num_seqs
    runner = FakeKVRunner(sched)
    for _ in range(6):
        runner.step()
    assert list(sched.waiting) == [b_seq, c_seq] and b_seq.num_preemptions == 1
    runner.run()
    assert [s.finish_reason for s in (b_seq, c_seq)] == ["length", "length"]
    assert_idle(sched)


def test_abort_mid_prefill_frees_blocks_at_once():
    sched = make(max_num_batched_tokens=8)
    (seq,) = sched.add_request("p", list(range(10, 30)), params())
    runner = FakeKVRunner(sched)
    assert shape(runner.step()) == [("p/0", 0, 8)]
    assert sched.block_manager.num_free_blocks == 5
    assert sched.abort("p") == [seq]
    assert seq.finish_reason == "abort" and seq.block_table == []
    assert sched.schedule().is_empty
    assert sched.abort("p") == [] and sched.abort("unknown") == []
    assert_idle(sched)


def test_abort_while_a_decode_step_is_in_flight():
    sched = make()
    (a,) = sched.add_request("a", list(range(6)), params(max_tokens=5))
    (b,) = sched.add_request("b", list(range(20, 26)), params(max_tokens=2))
    runner = FakeKVRunner(sched)
    runner.step()
    out = sched.schedule()
    assert shape(out) == [("a/0", 6, 1), ("b/0", 6, 1)]
    sched.abort("a")  # the runner is still computing `out`
    sched.update_from_output(out, [7, 8])
    assert a.output_token_ids == [100] and a.finish_reason == "abort"
    assert b.output_token_ids == [100, 8] and b.finish_reason == "length"
    assert_idle(sched)


def test_abort_a_group_before_and_after_its_fork():
    sched = make(max_num_batched_tokens=4)
    before = sched.add_request("before", [1, 3, 4, 5, 6], params(n=3))
    assert sched.get_stats().num_waiting == 3
    assert sched.abort("before") == before and not sched.waiting
    after = sched.add_request("after", [1, 3, 4, 5, 6], params(n=3, max_tokens=9))
    runner = FakeKVRunner(sched)
    assert shape(runner.step()) == [("after/0", 0, 4)]  # children still wait for the fork
    assert shape(runner.step()) == [("after/0", 4, 1)]
    assert [s.status for s in after] == [SequenceStatus.RUNNING] * 3
    runner.step()
    assert sched.abort("after") == after
    assert all(s.finish_reason == "abort" for s in before + after)
    assert_idle(sched)


def _check_block_accounting(sched: Scheduler) -> None:
    bm = sched.block_manager
    expected = [0] * bm.num_blocks
    for seq in sched.running:
        for block_id in seq.block_table:
            expected[block_id] += 1
    assert [b.ref_count for b in bm.blocks] == expected
    assert all(not seq.block_table for seq in sched.waiting)
    assert bm.num_free_blocks == expected.count(0)


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_random_workload_keeps_kv_exact_and_returns_every_block(seed, chunked):
    rng = random.Random(seed)
    sched = make(num_blocks=12, max_num_seqs=4, max_num_batched_tokens=16 if chunked else 48,
                 chunked=chunked, max_model_len=48)
    prefixes = [[rng.randrange(3, 60) for _ in range(8)] for _ in range(3)]
    runner = FakeKVRunner(sched, sample=lambda seq: rng.choice([EOS] + list(range(3, 40))))
    all_seqs: list[Sequence] = []
    for step in range(400):
        if step < 60 and rng.random() < 0.4:
            prompt = rng.choice(prefixes)[: rng.randrange(1, 9)] + [rng.randrange(3, 60) for _ in range(rng.randrange(0, 20))]
            sp = params(n=rng.choice([1, 1, 2, 3]), max_tokens=rng.randrange(2, 20), min_tokens=rng.choice([0, 2]))
            all_seqs += sched.add_request(f"r{step}", prompt, sp)
        if rng.random() < 0.05 and all_seqs:
            sched.abort(rng.choice(all_seqs).request_id)
        if not sched.has_unfinished_seqs() and step >= 60:
            break
        runner.step()
        _check_block_accounting(sched)
    assert all(s.is_finished for s in all_seqs)
    assert all(s.num_output_tokens <= s.sampling_params.max_tokens for s in all_seqs)
    assert_idle(sched)
    stats = sched.get_stats()
    assert stats.prefix_cache_hits > 0
    if chunked:  # 12 blocks under 4 growing sequences must run out
        assert stats.num_preemptions > 0
