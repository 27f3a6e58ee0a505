"""Paged KV bookkeeping: block ids, ref counts, automatic prefix caching, copy-on-write.

The KV cache is `num_blocks` blocks of `block_size` token slots. A sequence's
`block_table` maps its token positions to blocks; token t lives in slot
`block_table[t // block_size] * block_size + t % block_size`.

    block_size = 4, prompt "A B C D E F" (6 tokens), n = 2 after fork:

    seq 0  block_table [3, 7]    block 3: | A | B | C | D |  ref 2, hash h0 = H(None, ABCD)
    seq 1  block_table [3, 7]    block 7: | E | F | . | . |  ref 2, not full: never hashed

    seq 0 writes its next token at slot 7*4+2, but block 7 is shared: copy-on-write
    gives seq 0 a fresh block 8 and records (7, 8) for the model runner to copy
    before the step; block 7 drops to ref 1 and seq 1 may write it in place.

Prefix caching: a FULL block whose K/V are all computed is registered under the
chained hash h_i = blake2b-128(h_{i-1} || int64 token ids of block i). Chaining makes
a hit on block i imply a hit on blocks 0..i-1. blake2b over the bytes (not Python's
`hash`) so ids are stable across processes and a collision (which would silently
serve another prompt's K/V) is out of reach. A block whose hash is already
registered by another block is not registered twice.

Free blocks live in two queues, each in release order:

    uncached  (no hash)    head -> [ 4, 5, 6, 2 ]       taken first
    cached    (hash kept)  head -> [ 9 (LRU), 1, 0 ]    evicted from the head only
                                    when `uncached` is empty

A cache hit on a free cached block takes it out of the queue (ref 0 -> 1). A
sequence releases its blocks last-to-first, so a prompt's tail is evicted before
its (more shareable) head. `num_free_blocks` counts both queues.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections import OrderedDict
from collections.abc import Sequence as SequenceLike

from llmctl.engine.sequence import Sequence
from llmctl.errors import CacheCapacityError


def hash_block_tokens(parent_hash: bytes | None, token_ids: SequenceLike[int]) -> bytes:
    """The chained hash of one full block: 16 bytes, stable across processes and runs."""
    tokens = array("q", token_ids)
    if sys.byteorder != "little":
        tokens.byteswap()
    digest = hashlib.blake2b(parent_hash or b"", digest_size=16)
    digest.update(tokens.tobytes())
    return digest.digest()


class Block:
    __slots__ = ("block_id", "ref_count", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: bytes | None = None  # set while registered in the prefix cache

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref_count={self.ref_count}, cached={self.block_hash is not None})"


class BlockManager:
    """Owns every KV block; sequences hold them only through `block_table`.

    Query/action pairs: `can_allocate`/`allocate` (a waiting sequence's tokens),
    `can_append`/`append_slot` (room for the next token(s) of a running sequence).
    `free` releases a sequence's blocks, `fork` shares them with a sibling,
    `cache_computed_blocks` offers newly computed full blocks to the prefix cache,
    `take_blocks_to_copy` hands the pending copy-on-write copies to the caller.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise CacheCapacityError(f"num_blocks: must be positive, got {num_blocks}")
        if block_size <= 0:
            raise CacheCapacityError(f"block_size: must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free_uncached: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # head = least recently used
        self._cached_block_ids: dict[bytes, int] = {}
        self._num_offered: dict[int, int] = {}  # seq_id -> leading blocks already offered to the cache
        self._blocks_to_copy: list[tuple[int, int]] = []
        # Copy-on-write sources stay out of the free queues until the copy list is
        # taken, so no block is both copied from and reused within one step.
        self._cow_sources: set[int] = set()
        self.num_prefix_queries = 0  # tokens looked up in the prefix cache
        self.num_prefix_hits = 0  # tokens found

    # ---- counters ------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def num_cached_free_blocks(self) -> int:
        return len(self._free_cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences (evictable cached blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.num_prefix_hits / self.num_prefix_queries if self.num_prefix_queries else 0.0

    def num_required_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- waiting -> running ----------------------------------------------------
    def get_num_cached_tokens(self, seq: Sequence) -> int:
        """Leading tokens of `seq` the prefix cache would serve right now (no side effects)."""
        return len(self._find_cached_prefix(seq)) * self.block_size

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._find_cached_prefix(seq)
        # A hit on an in-use block costs nothing; a hit on a free cached block takes a free slot.
        num_shared = sum(1 for block_id in hits if self.blocks[block_id].ref_count > 0)
        return self.num_required_blocks(seq.num_tokens) - num_shared <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Blocks for all of `seq.token_ids`: cached prefix blocks first, fresh ones after.

        Sets `seq.num_computed_tokens` to the cached prefix length (a multiple of
        block_size, at most num_tokens - 1: the last token always runs so the model
        produces logits for it).
        """
        if seq.block_table:
            raise RuntimeError(f"allocate: sequence {seq.seq_id} already holds blocks")
        if not self.can_allocate(seq):
            raise CacheCapacityError(f"allocate: not enough free KV blocks for sequence {seq.seq_id}",
                                     hint="call can_allocate first")
        hits = self._find_cached_prefix(seq)
        for block_id in hits:
            self._take_cached(block_id)
        num_new = self.num_required_blocks(seq.num_tokens) - len(hits)
        seq.block_table = hits + [self._take_free() for _ in range(num_new)]
        seq.num_computed_tokens = len(hits) * self.block_size
        self._num_offered[seq.seq_id] = len(hits)
        if self.enable_prefix_caching and seq.reads_prefix_cache:
            self.num_prefix_queries += seq.num_tokens
            self.num_prefix_hits += seq.num_computed_tokens
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = seq.num_computed_tokens

    # ---- running ---------------------------------------------------------------
    def can_append(self, seq: Sequence) -> bool:
        return self._num_append_blocks(seq) <= self.num_free_blocks

    def append_slot(self, seq: Sequence) -> None:
        """Make every uncomputed token of `seq` writable: new blocks past the table's
        end, and a private copy of any shared block it would write into. Call
        `can_append` first: running out of blocks midway raises CacheCapacityError."""
        table = seq.block_table
        for i in range(seq.num_computed_tokens // self.block_size, len(table)):
            if self.blocks[table[i]].ref_count > 1:
                self._copy_on_write(seq, i)
        while len(table) < self.num_required_blocks(seq.num_tokens):
            table.append(self._take_free())

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` (whose tokens are a prefix of the parent's) shares the parent's blocks.

        The child's last token is left uncomputed so it runs once more and yields the
        child's own logits; writing it triggers copy-on-write while the block is shared.
        """
        if child.block_table:
            raise RuntimeError(f"fork: sequence {child.seq_id} already holds blocks")
        num_blocks = self.num_required_blocks(child.num_tokens)
        if num_blocks > len(parent.block_table) or parent.token_ids[: child.num_tokens] != child.token_ids:
            raise RuntimeError(f"fork: sequence {child.seq_id} is not a prefix of sequence {parent.seq_id}")
        child.block_table = parent.block_table[:num_blocks]
        for block_id in child.block_table:
            self.blocks[block_id].ref_count += 1
        child.num_computed_tokens = min(parent.num_computed_tokens, child.num_tokens - 1)
        child.block_hashes = parent.block_hashes[: child.num_tokens // self.block_size]
        self._num_offered[child.seq_id] = min(self._num_offered.get(parent.seq_id, 0), num_blocks)

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks, last block first (so a prompt's tail is evicted first)."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._num_offered.pop(seq.seq_id, None)

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register the full blocks of `seq` whose K/V are now all computed."""
        if not self.enable_prefix_caching:
            return
        start = self._num_offered.get(seq.seq_id, 0)
        end = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if end <= start:
            return
        hashes = self._full_block_hashes(seq, end)
        for i in range(start, end):
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is None and hashes[i] not in self._cached_block_ids:
                block.block_hash = hashes[i]
                self._cached_block_ids[hashes[i]] = block.block_id
        self._num_offered[seq.seq_id] = end

    def take_blocks_to_copy(self) -> list[tuple[int, int]]:
        """The (src_block, dst_block) copies recorded since the last call, in order.

        The model runner must copy every layer's K and V of src into dst before the
        step's forward pass. No block is both a source and a destination in one list
        (sources stay out of the free queues until this call), so the copies may run
        as one batched gather/scatter.
        """
        copies, self._blocks_to_copy = self._blocks_to_copy, []
        for block_id in self._cow_sources:
            if self.blocks[block_id].ref_count == 0:
                self._push_free(block_id)
        self._cow_sources.clear()
        return copies

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (e.g. between benchmark runs). Only when no block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block_id in self._free_cached:
            self.blocks[block_id].block_hash = None
            self._free_uncached[block_id] = None
        self._free_cached.clear()
        self._cached_block_ids.clear()
        return True

    # ---- internals -------------------------------------------------------------
    def _full_block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        hashes, size = seq.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(hash_block_tokens(hashes[-1] if hashes else None, seq.token_ids[i * size:(i + 1) * size]))
        return hashes

    def _find_cached_prefix(self, seq: Sequence) -> list[int]:
        if not self.enable_prefix_caching or not seq.reads_prefix_cache:
            return []
        max_hits = (seq.num_tokens - 1) // self.block_size  # leave at least one token to run
        hits = []
        for block_hash in self._full_block_hashes(seq, max_hits)[:max_hits]:
            block_id = self._cached_block_ids.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def _num_append_blocks(self, seq: Sequence) -> int:
        table = seq.block_table
        first = seq.num_computed_tokens // self.block_size
        num_shared = sum(1 for block_id in table[first:] if self.blocks[block_id].ref_count > 1)
        return max(0, self.num_required_blocks(seq.num_tokens) - len(table)) + num_shared

    def _copy_on_write(self, seq: Sequence, i: int) -> None:
        src = seq.block_table[i]
        dst = self._take_free()
        self._cow_sources.add(src)
        self._release(src)
        seq.block_table[i] = dst
        self._blocks_to_copy.append((src, dst))

    def _take_free(self) -> int:
        if self._free_uncached:
            block_id, _ = self._free_uncached.popitem(last=False)
        elif self._free_cached:
            block_id, _ = self._free_cached.popitem(last=False)
            block = self.blocks[block_id]
            del self._cached_block_ids[block.block_hash]  # evict the least recently used
            block.block_hash = None
        else:
            raise CacheCapacityError("no free KV block")
        self.blocks[block_id].ref_count = 1
        return block_id

    def _take_cached(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self._free_cached.pop(block_id, None)  # absent while a pending copy-on-write source
        block.ref_count += 1

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count <= 0:
            raise RuntimeError(f"block {block_id} released more often than taken")
        block.ref_count -= 1
        if block.ref_count == 0 and block_id not in self._cow_sources:
            self._push_free(block_id)

    def _push_free(self, block_id: int) -> None:
        queue = self._free_uncached if self.blocks[block_id].block_hash is None else self._free_cached
        queue[block_id] = None
