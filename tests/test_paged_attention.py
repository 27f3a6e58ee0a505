"""The torch paged-attention path against dense causal attention on contiguous K/V.

Each test plays engine steps: sequences own shuffled, non-contiguous blocks; every step
writes its new tokens through the slot mapping and must match float64 attention over
the sequence's whole K/V laid out contiguously.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from llmctl.layers.attention import Attention, AttentionMetadata, attention_metadata
from llmctl.layers.paged_attention import AttentionShapeError, paged_attention


class PagedWorld:
    """Sequences with known full Q/K/V and shuffled blocks in one shared cache."""

    def __init__(self, seq_lens, num_heads, num_kv_heads, head_dim=8, block_size=4, dtype=torch.float32, seed=0,
                 sliding_window=None):
        self.gen = torch.Generator().manual_seed(seed)
        self.window = sliding_window
        self.h, self.hkv, self.dh, self.bs, self.dtype = num_heads, num_kv_heads, head_dim, block_size, dtype
        blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
        num_blocks = sum(blocks_per_seq) + 3  # spare blocks that no sequence owns
        ids = torch.randperm(num_blocks, generator=self.gen).tolist()
        self.block_ids = []
        for n in blocks_per_seq:
            self.block_ids.append(ids[:n])
            ids = ids[n:]
        # Junk of large magnitude, so reading a slot that is not ours changes the answer.
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k_cache = (torch.randn(shape, generator=self.gen) * 50).to(dtype)
        self.v_cache = (torch.randn(shape, generator=self.gen) * 50).to(dtype)
        self.q = [self._rand(n, num_heads) for n in seq_lens]
        self.k = [self._rand(n, num_kv_heads) for n in seq_lens]
        self.v = [self._rand(n, num_kv_heads) for n in seq_lens]
        self.scale = head_dim**-0.5

    def _rand(self, n, heads):
        return torch.randn(n, heads, self.dh, generator=self.gen).to(self.dtype)

    def slot(self, seq, pos):
        return self.block_ids[seq][pos // self.bs] * self.bs + pos % self.bs

    def prefill_cache(self, seq, num_tokens):
        """Pretend tokens 0..num_tokens-1 were computed earlier (a prefix-cache hit)."""
        for pos in range(num_tokens):
            block, off = divmod(self.slot(seq, pos), self.bs)
            self.k_cache[block, off] = self.k[seq][pos]
            self.v_cache[block, off] = self.v[seq][pos]

    def meta(self, chunks):
        """chunks: [(seq, start, end)], new tokens start..end-1 of each seq."""
        width = max(len(self.block_ids[s]) for s, _, _ in chunks)
        tables = [self.block_ids[s] + [0] * (width - len(self.block_ids[s])) for s, _, _ in chunks]
        qsl = [0]
        for _, start, end in chunks:
            qsl.append(qsl[-1] + end - start)
        return AttentionMetadata(
            slot_mapping=torch.tensor([self.slot(s, p) for s, a, e in chunks for p in range(a, e)], dtype=torch.int64),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            seq_lens=torch.tensor([e for _, _, e in chunks], dtype=torch.int32),
            max_query_len=max(e - a for _, a, e in chunks),
            max_seq_len=max(e for _, _, e in chunks),
            block_size=self.bs,
        )

    def step(self, chunks, meta=None):
        meta = meta or self.meta(chunks)
        q = torch.cat([self.q[s][a:e] for s, a, e in chunks])
        k = torch.cat([self.k[s][a:e] for s, a, e in chunks])
        v = torch.cat([self.v[s][a:e] for s, a, e in chunks])
        out = paged_attention(q, k, v, self.k_cache, self.v_cache, meta, self.scale, self.window)
        return out, meta

    def expected(self, chunks):
        """Dense float64 causal attention of the chunks' tokens over contiguous K/V (with a
        window W: query i sees keys i - W + 1 .. i)."""
        group = self.h // self.hkv
        outs = []
        for s, start, end in chunks:
            q = self.q[s][start:end].double().transpose(0, 1)  # [H, Lq, Dh]
            k = self.k[s][:end].double().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, L, Dh]
            v = self.v[s][:end].double().repeat_interleave(group, dim=1).transpose(0, 1)
            scores = q @ k.transpose(1, 2) * self.scale
            behind = torch.arange(start, end)[:, None] - torch.arange(end)[None, :]  # query - key
            causal = (behind >= 0) & (behind < (self.window or end))
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            outs.append((probs @ v).transpose(0, 1))
        return torch.cat(outs)

    def check(self, chunks, atol=1e-5, rtol=1e-5):
        out, _ = self.step(chunks)
        assert out.shape == (sum(e - a for _, a, e in chunks), self.h, self.dh)
        assert out.dtype == self.dtype
        torch.testing.assert_close(out.double(), self.expected(chunks), atol=atol, rtol=rtol)
        for s, start, end in chunks:
            for pos in (start, end - 1):
                block, off = divmod(self.slot(s, pos), self.bs)
                assert torch.equal(self.k_cache[block, off], self.k[s][pos])
                assert torch.equal(self.v_cache[block, off], self.v[s][pos])


HEADS = [(6, 2), (9, 3), (4, 4)]


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("heads", HEADS)
def test_prefill_of_several_sequences(block_size, heads):
    lens = [1, 7, 33, 16]
    world = PagedWorld(lens, *heads, block_size=block_size)
    world.check([(s, 0, n) for s, n in enumerate(lens)])


@pytest.mark.parametrize("block_size", [4, 16])
def test_chunked_prefill_in_two_steps(block_size):
    lens = [29, 18]
    world = PagedWorld(lens, 6, 2, block_size=block_size, seed=1)
    world.check([(0, 0, 11), (1, 0, 18)])
    world.check([(0, 11, 29)])


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("heads", [(6, 2), (9, 3)])
def test_prefill_after_prefix_hit(block_size, heads):
    lens = [2 * block_size + 5, block_size + 1]
    world = PagedWorld(lens, *heads, block_size=block_size, seed=2)
    world.prefill_cache(0, 2 * block_size)
    world.prefill_cache(1, block_size)
    world.check([(0, 2 * block_size, lens[0]), (1, block_size, lens[1])])


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("heads", HEADS)
def test_decode_steps_for_a_batch(block_size, heads):
    prompts = [3, 17, 8, 1]
    num_steps = 6
    world = PagedWorld([n + num_steps for n in prompts], *heads, block_size=block_size, seed=3)
    world.check([(s, 0, n) for s, n in enumerate(prompts)])
    for step in range(num_steps):
        world.check([(s, n + step, n + step + 1) for s, n in enumerate(prompts)])


@pytest.mark.parametrize("block_size", [4, 16])
def test_mixed_batch_of_decodes_and_a_prefill_chunk(block_size):
    lens = [12, 30, 5, 40]
    world = PagedWorld(lens, 9, 3, block_size=block_size, seed=4)
    world.check([(0, 0, 11), (1, 0, 29), (2, 0, 4), (3, 0, 9)])
    world.check([(0, 11, 12), (3, 9, 25), (1, 29, 30), (2, 4, 5)])
    world.check([(3, 25, 40)])


@pytest.mark.parametrize("window", [1, 5, 8, 13])
@pytest.mark.parametrize("block_size", [4, 16])
def test_sliding_window_in_prefill_chunks_and_decodes(window, block_size):
    """Mistral's window: contexts grow well past it through chunks, a prefix hit and decodes."""
    lens = [30, 26, 9]
    world = PagedWorld(lens, 6, 2, block_size=block_size, seed=8, sliding_window=window)
    world.prefill_cache(1, 8)
    world.check([(0, 0, 11), (1, 8, 20), (2, 0, 3)])
    world.check([(0, 11, 24), (1, 20, 21), (2, 3, 4)])
    for step in range(5):
        world.check([(0, 24 + step, 25 + step), (1, 21 + step, 22 + step), (2, 4 + step, 5 + step)])


def test_sliding_window_changes_attention_past_it():
    """The window is not a no-op: past it, full causal attention gives another answer."""
    world = PagedWorld([20], 6, 2, seed=9, sliding_window=6)
    out, _ = world.step([(0, 0, 20)])
    world.window = None
    full = world.expected([(0, 0, 20)])
    assert torch.allclose(out[:6].double(), full[:6], atol=1e-5)
    assert (out[6:].double() - full[6:]).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cache(dtype):
    lens = [21, 9]
    world = PagedWorld(lens, 6, 2, head_dim=16, dtype=dtype, seed=5)
    world.check([(0, 0, 13), (1, 0, 8)], atol=2e-2, rtol=2e-2)
    world.check([(0, 13, 21), (1, 8, 9)], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("window", [None, 5])
def test_attention_layer_with_metadata_matches_dense_causal(window):
    torch.manual_seed(6)
    heads, kv_heads, head_dim, seq_len, block_size = 9, 3, 16, 13, 4
    layer = Attention(heads, kv_heads, head_dim, scale=head_dim**-0.5, sliding_window=window)
    q = torch.randn(seq_len, heads * head_dim)
    k = torch.randn(seq_len, kv_heads * head_dim)
    v = torch.randn(seq_len, kv_heads * head_dim)
    dense = layer(q, k, v)
    blocks = [5, 2, 7, 0]
    layer.k_cache = torch.zeros(8, block_size, kv_heads, head_dim)
    layer.v_cache = torch.zeros(8, block_size, kv_heads, head_dim)
    slots = [blocks[p // block_size] * block_size + p % block_size for p in range(seq_len)]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=torch.tensor([blocks], dtype=torch.int32),
        query_start_loc=torch.tensor([0, seq_len], dtype=torch.int32),
        seq_lens=torch.tensor([seq_len], dtype=torch.int32),
        max_query_len=seq_len, max_seq_len=seq_len, block_size=block_size,
    )
    with attention_metadata(meta):
        paged = layer(q, k, v)
    torch.testing.assert_close(paged, dense, atol=1e-5, rtol=1e-5)


def test_mismatched_cache_is_rejected_with_the_field_named():
    world = PagedWorld([5], 6, 2, block_size=4)
    world.k_cache = world.k_cache[:, :, :1].contiguous()
    with pytest.raises(AttentionShapeError, match="k_cache"):
        world.step([(0, 0, 5)])


def test_block_table_too_narrow_is_rejected():
    world = PagedWorld([9], 6, 2, block_size=4)
    meta = world.meta([(0, 0, 9)])
    meta = dataclasses.replace(meta, block_tables=meta.block_tables[:, :2])
    with pytest.raises(AttentionShapeError, match="block_tables"):
        world.step([(0, 0, 9)], meta)


def test_llama_steps_through_the_cache_match_its_dense_forward():
    """A shrunk Llama: chunked prefill, then a decode, paged, equals one dense pass."""
    from llmctl.models.arch import ModelArch
    from llmctl.models.llama import LlamaForCausalLM

    torch.manual_seed(7)
    arch = ModelArch(
        architecture="LlamaForCausalLM", vocab_size=100, hidden_size=96, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
        tie_word_embeddings=False, attention_bias=False, torch_dtype="float32",
    )
    model = LlamaForCausalLM(arch)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.1)
    seq_len, block_size, blocks = 20, 4, [3, 9, 1, 6, 0]
    ids = torch.randint(0, arch.vocab_size, (seq_len,))
    with torch.no_grad():
        dense = model(ids[None], torch.arange(seq_len)[None])[0]
    for layer in model.model.layers:
        layer.self_attn.attn.k_cache = torch.zeros(10, block_size, 2, 16)
        layer.self_attn.attn.v_cache = torch.zeros(10, block_size, 2, 16)
    outs = []
    slots = [blocks[p // block_size] * block_size + p % block_size for p in range(seq_len)]
    for start, end in [(0, 7), (7, 19), (19, 20)]:
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots[start:end]),
            block_tables=torch.tensor([blocks], dtype=torch.int32),
            query_start_loc=torch.tensor([0, end - start], dtype=torch.int32),
            seq_lens=torch.tensor([end], dtype=torch.int32),
            max_query_len=end - start, max_seq_len=end, block_size=block_size,
        )
        with attention_metadata(meta), torch.no_grad():
            outs.append(model(ids[start:end], torch.arange(start, end)))
    torch.testing.assert_close(torch.cat(outs), dense, atol=1e-5, rtol=1e-5)
