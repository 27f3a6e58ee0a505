"""BlockManager on tiny specs (block_size 4, 10 blocks): exact block ids, ref counts, LRU order."""

from __future__ import annotations

import pytest

from llmctl.engine.block_manager import BlockManager, hash_block_tokens
from llmctl.engine.sequence import Sequence
from llmctl.errors import CacheCapacityError

BLOCK_SIZE = 4
NUM_BLOCKS = 10


def make_bm(enable_prefix_caching: bool = True, num_blocks: int = NUM_BLOCKS) -> BlockManager:
    return BlockManager(num_blocks, BLOCK_SIZE, enable_prefix_caching)


def refs(bm: BlockManager) -> list[int]:
    return [block.ref_count for block in bm.blocks]


def prefill(bm: BlockManager, seq: Sequence) -> None:
    """Allocate, compute the whole sequence and offer its full blocks to the cache."""
    bm.allocate(seq)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_computed_blocks(seq)


def assert_idle(bm: BlockManager) -> None:
    assert bm.take_blocks_to_copy() == []
    assert bm.num_free_blocks == bm.num_blocks
    assert refs(bm) == [0] * bm.num_blocks
    assert bm.usage == 0.0


def test_allocate_exact_ids_and_free_returns_everything():
    bm = make_bm()
    a = Sequence("a", list(range(10)))  # 3 blocks: 4 + 4 + 2
    b = Sequence("b", list(range(100, 105)))  # 2 blocks
    assert bm.can_allocate(a)
    bm.allocate(a)
    bm.allocate(b)
    assert a.block_table == [0, 1, 2] and b.block_table == [3, 4]
    assert a.num_computed_tokens == 0 and a.num_cached_tokens == 0
    assert refs(bm) == [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    assert bm.num_free_blocks == 5 and bm.usage == pytest.approx(0.5)
    bm.free(a)
    assert a.block_table == [] and bm.num_free_blocks == 8
    # Uncached blocks return to the free queue last-block-first, behind the never-used ones.
    c = Sequence("c", list(range(200, 232)))  # 8 blocks
    bm.allocate(c)
    assert c.block_table == [5, 6, 7, 8, 9, 2, 1, 0]
    bm.free(b)
    bm.free(c)
    assert_idle(bm)


def test_can_allocate_refuses_and_allocate_raises_when_full():
    bm = make_bm()
    big = Sequence("big", list(range(37)))  # 10 blocks
    bm.allocate(big)
    small = Sequence("small", [1])
    assert not bm.can_allocate(small)
    with pytest.raises(CacheCapacityError):
        bm.allocate(small)
    bm.free(big)
    assert bm.can_allocate(small)
    assert_idle(bm)


def test_prefix_hit_shares_in_use_blocks_across_requests():
    bm = make_bm()
    a = Sequence("a", list(range(10)))
    prefill(bm, a)  # blocks 0, 1 are full and computed: cached; block 2 is partial
    assert [bm.blocks[i].block_hash is not None for i in (0, 1, 2)] == [True, True, False]
    b = Sequence("b", list(range(8)) + [55, 56, 57])
    assert bm.get_num_cached_tokens(b) == 8
    bm.allocate(b)
    assert b.block_table == [0, 1, 3]
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert refs(bm)[:4] == [2, 2, 1, 1]
    assert (bm.num_prefix_queries, bm.num_prefix_hits) == (10 + 11, 8)
    bm.free(a)
    assert refs(bm)[:4] == [1, 1, 0, 1]
    bm.free(b)
    assert_idle(bm)


def test_hit_always_leaves_the_last_token_to_compute():
    bm = make_bm()
    a = Sequence("a", list(range(8)))
    prefill(bm, a)
    same = Sequence("same", list(range(8)))  # both blocks cached, but logits need a token to run
    bm.allocate(same)
    assert same.block_table[0] == 0 and same.block_table[1] != 1
    assert same.num_computed_tokens == 4
    longer = Sequence("longer", list(range(9)))
    bm.allocate(longer)
    assert longer.block_table[:2] == [0, 1] and longer.num_computed_tokens == 8
    for seq in (a, same, longer):
        bm.free(seq)
    assert_idle(bm)


def test_freed_cached_block_is_reused_then_not_after_eviction():
    bm = make_bm()
    a = Sequence("a", list(range(12)))
    prefill(bm, a)  # blocks 0, 1, 2 all cached
    bm.free(a)
    assert bm.num_free_blocks == 10 and bm.num_cached_free_blocks == 3
    again = Sequence("again", list(range(12)) + [99])
    assert bm.can_allocate(again)
    bm.allocate(again)
    assert again.block_table == [0, 1, 2, 3] and again.num_computed_tokens == 12
    assert bm.num_free_blocks == 6 and bm.num_cached_free_blocks == 0
    bm.free(again)
    # Fill the cache with unrelated tokens: 6 never-used blocks go first, then cached
    # ones are evicted, least recently released first (again's tail: 2, then 1).
    filler = Sequence("filler", list(range(500, 532)))
    bm.allocate(filler)
    assert filler.block_table == [4, 5, 6, 7, 8, 9, 3, 2]
    assert bm.blocks[2].block_hash is None
    probe = Sequence("probe", list(range(12)) + [7])
    assert bm.get_num_cached_tokens(probe) == 8  # blocks 0, 1 survive; block 2 was evicted
    bm.free(filler)
    bm.allocate(probe)
    assert probe.block_table[:2] == [0, 1] and probe.num_computed_tokens == 8
    bm.free(probe)
    assert_idle(bm)


def test_lru_evicts_the_least_recently_released_sequence_first():
    bm = make_bm()
    old = Sequence("old", list(range(8)))
    new = Sequence("new", list(range(100, 108)))
    prefill(bm, old)  # blocks 0, 1
    prefill(bm, new)  # blocks 2, 3
    bm.free(old)
    bm.free(new)
    filler = Sequence("filler", list(range(500, 528)))  # 7 blocks: 6 never-used + 1 evicted
    bm.allocate(filler)
    assert filler.block_table == [4, 5, 6, 7, 8, 9, 1]
    grow = Sequence("grow", list(range(600, 603)))
    bm.allocate(grow)
    assert grow.block_table == [0]
    assert bm.get_num_cached_tokens(Sequence("o", list(range(9)))) == 0
    assert bm.get_num_cached_tokens(Sequence("n", list(range(100, 109)))) == 8
    bm.free(filler)
    bm.free(grow)
    assert_idle(bm)


def test_fork_shares_blocks_and_copy_on_write_records_exact_copies():
    bm = make_bm()
    parent = Sequence("r", list(range(6)))
    prefill(bm, parent)  # blocks [0, 1], block 1 half full
    children = [Sequence("r", list(range(6)), index=i) for i in (1, 2)]
    for child in children:
        bm.fork(parent, child)
        assert child.block_table == [0, 1] and child.num_computed_tokens == 5
    assert refs(bm)[:3] == [3, 3, 0]
    parent.append_token(42)  # writes position 6 into shared block 1
    assert bm.can_append(parent)
    bm.append_slot(parent)
    assert parent.block_table == [0, 2]
    bm.append_slot(children[0])  # reruns position 5; block 1 is still shared with children[1]
    assert children[0].block_table == [0, 3]
    bm.append_slot(children[1])  # now the only holder: writes in place
    assert children[1].block_table == [0, 1]
    assert refs(bm)[:4] == [3, 1, 1, 1]
    assert bm.take_blocks_to_copy() == [(1, 2), (1, 3)]
    assert bm.take_blocks_to_copy() == []
    for seq in (parent, *children):
        bm.free(seq)
    assert_idle(bm)


def test_copy_source_is_not_reused_before_the_copy_list_is_taken():
    bm = make_bm(num_blocks=3)
    parent = Sequence("r", list(range(6)))
    prefill(bm, parent)  # [0, 1]
    child = Sequence("r", list(range(6)), index=1)
    bm.fork(parent, child)
    parent.append_token(9)
    bm.append_slot(parent)  # copy 1 -> 2
    bm.free(child)  # block 1 drops to ref 0, but the runner has yet to copy from it
    assert bm.num_free_blocks == 0
    assert not bm.can_allocate(Sequence("x", [1]))
    assert bm.take_blocks_to_copy() == [(1, 2)]
    assert bm.num_free_blocks == 1
    bm.free(parent)
    assert_idle(bm)


def test_append_slot_takes_a_new_block_only_at_a_block_boundary():
    bm = make_bm()
    seq = Sequence("s", list(range(4)))
    prefill(bm, seq)
    assert seq.block_table == [0]
    seq.append_token(1)  # position 4: a new block
    assert bm.can_append(seq)
    bm.append_slot(seq)
    assert seq.block_table == [0, 1] and bm.num_free_blocks == 8
    seq.num_computed_tokens += 1
    seq.append_token(2)  # position 5: same block
    bm.append_slot(seq)
    assert seq.block_table == [0, 1] and bm.num_free_blocks == 8
    bm.free(seq)
    assert_idle(bm)


def test_same_content_computed_twice_is_registered_once():
    bm = make_bm()
    a, b = Sequence("a", list(range(5))), Sequence("b", list(range(5)))
    bm.allocate(a)
    bm.allocate(b)  # nothing cached yet: both compute block 0's content
    for seq in (a, b):
        seq.num_computed_tokens = 5
        bm.cache_computed_blocks(seq)
    assert bm.blocks[0].block_hash is not None and bm.blocks[2].block_hash is None
    bm.free(a)
    bm.free(b)
    assert bm.num_cached_free_blocks == 1
    assert_idle(bm)


def test_prefix_caching_disabled_never_hits():
    bm = make_bm(enable_prefix_caching=False)
    a = Sequence("a", list(range(9)))
    prefill(bm, a)
    bm.free(a)
    b = Sequence("b", list(range(9)))
    bm.allocate(b)
    assert b.num_computed_tokens == 0 and bm.num_prefix_queries == 0
    assert all(block.block_hash is None for block in bm.blocks)
    bm.free(b)
    assert_idle(bm)


def test_reset_prefix_cache_only_when_idle():
    bm = make_bm()
    a = Sequence("a", list(range(8)))
    prefill(bm, a)
    assert not bm.reset_prefix_cache()
    bm.free(a)
    assert bm.reset_prefix_cache()
    assert bm.num_cached_free_blocks == 0
    assert bm.get_num_cached_tokens(Sequence("b", list(range(9)))) == 0
    assert_idle(bm)


def test_block_hash_is_chained_and_content_addressed():
    h0 = hash_block_tokens(None, [1, 2, 3, 4])
    assert h0 == hash_block_tokens(None, (1, 2, 3, 4)) and len(h0) == 16
    assert hash_block_tokens(h0, [5, 6, 7, 8]) != hash_block_tokens(None, [5, 6, 7, 8])
    assert hash_block_tokens(None, [1, 2, 3, 5]) != h0
    # Large ids (vocab > 2**16) must not collide through truncation.
    assert hash_block_tokens(None, [1 << 20, 0, 0, 0]) != hash_block_tokens(None, [0, 0, 0, 0])


def test_fork_rejects_a_child_that_is_not_a_prefix():
    bm = make_bm()
    parent = Sequence("r", list(range(6)))
    prefill(bm, parent)
    with pytest.raises(RuntimeError, match="not a prefix"):
        bm.fork(parent, Sequence("r", [9, 9, 9]))
    bm.free(parent)
    assert_idle(bm)
