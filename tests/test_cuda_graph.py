"""CUDA graphs for decode and prefill steps: bucket sizes and staged prefill inputs (CPU), and on a
GPU (`-m gpu`) replayed steps that give the eager engine's tokens for dense and GPTQ models, padded
batches and chunked prefills included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmctl.engine.cuda_graph import capture_sizes
from llmctl.sampling_params import SamplingParams

ARCH_RECIPE = """
name: small
model:
  path: ./nowhere
  dtype: float16
  max_model_len: 512
  arch:
    architectures: [LlamaForCausalLM]
    vocab_size: 1024
    hidden_size: 256
    intermediate_size: 512
    num_hidden_layers: 3
    num_attention_heads: 8
    num_key_value_heads: 2
    head_dim: 32
    max_position_embeddings: 512
    torch_dtype: float16
"""


def test_capture_sizes_cover_max_num_seqs_with_few_buckets():
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 4]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(17) == [1, 2, 4, 8, 16, 32]
    assert capture_sizes(128)[-1] == 128 and len(capture_sizes(128)) == 12
    assert capture_sizes(10_000)[-1] == 256  # larger batches run eagerly


def test_prefill_capture_sizes_cover_the_step_budget():
    from llmctl.engine.prefill_graph import prefill_capture_sizes

    small = [16, 32, 64, 128, 256, 512]
    large = [768, 1024, 1280, 1536, 1792, 2048]  # steps of 256 above 512
    assert prefill_capture_sizes(2048, 256) == (small + large, [1, 2, 4, 8])
    assert prefill_capture_sizes(8192, 256) == (small + large, [1, 2, 4, 8])  # the default limit, 2,048
    assert prefill_capture_sizes(512, 8) == (small, [1, 2, 4, 8])
    assert prefill_capture_sizes(48, 3) == ([16, 32, 48], [1, 2, 4])  # a 3-sequence step pads to 4
    assert prefill_capture_sizes(6, 1) == ([6], [1])
    # the limit (max_prefill_graph_tokens) caps the buckets and is one itself; 0 captures none
    assert prefill_capture_sizes(8192, 8, 512) == (small, [1, 2, 4, 8])
    assert prefill_capture_sizes(8192, 8, 1000) == (small + [768, 1000], [1, 2, 4, 8])
    assert prefill_capture_sizes(1100, 8, 4096) == (small + [768, 1024, 1100], [1, 2, 4, 8])
    assert prefill_capture_sizes(8192, 8, 0) == ([], [])


def test_prefill_graph_bucket_pads_fewer_than_256_tokens_above_512():
    """A step replays the smallest bucket that holds it: past 512 tokens it pads fewer than 256
    tokens, under 25% of the step from 1,024 on (a 1,025-token prompt computes 1,280 rows, not
    2,048)."""
    from llmctl.engine.graph_buckets import smallest_holding
    from llmctl.engine.prefill_graph import prefill_capture_sizes

    tokens, _ = prefill_capture_sizes(8192, 8, 2048)
    for n in range(513, 2049):
        bucket = smallest_holding(tokens, n)
        assert 0 <= bucket - n < 256
        assert n < 1024 or (bucket - n) / n < 0.25
    assert smallest_holding(tokens, 1025) == 1280
    assert smallest_holding(tokens, 16) == 16 and smallest_holding(tokens, 17) == 32
    assert smallest_holding(tokens, 2049) is None  # runs eagerly


def test_prefill_graph_inputs_pad_tokens_and_sequences():
    """A step of 13 tokens from 3 sequences (a prompt, a decode, a chunk after a cached prefix)
    staged for the (16, 4) buckets: every token's position and slot, empty padding sequences,
    padding tokens that write no slot, and each sequence's last row."""
    from llmctl.engine.prefill_graph import stage_inputs

    tmax, bmax, bs = 64, 8, 4
    longs = np.full(3 * tmax + bmax, 77, dtype=np.int64)
    ints = np.full(2 * bmax + 1 + bmax * 8, 77, dtype=np.int32)
    starts, lens = [0, 5, 9], [6, 1, 6]
    tables = [[3, 4, 0, 0], [7, 8, 0, 0], [1, 2, 5, 6]]
    token_ids = list(range(100, 113))
    used = stage_inputs(longs, ints, tmax, bmax, 16, 4, bs, token_ids, starts, lens, tables)
    positions = [p for s, n in zip(starts, lens) for p in range(s, s + n)]
    slots = [tables[i][p // bs] * bs + p % bs for i, (s, n) in enumerate(zip(starts, lens)) for p in range(s, s + n)]
    assert longs[:13].tolist() == token_ids
    assert longs[tmax:tmax + 13].tolist() == positions == [0, 1, 2, 3, 4, 5, 5, 9, 10, 11, 12, 13, 14]
    assert longs[2 * tmax:2 * tmax + 16].tolist() == slots + [-1, -1, -1]
    assert slots[:7] == [12, 13, 14, 15, 16, 17, 33] and slots[7:] == [21, 22, 23, 24, 25, 26]
    assert longs[3 * tmax:3 * tmax + 4].tolist() == [5, 6, 12, 0]
    assert ints[:5].tolist() == [0, 6, 7, 13, 13]  # the fourth sequence has no tokens
    assert ints[bmax + 1:bmax + 5].tolist() == [6, 6, 15, 1]
    assert used == 2 * bmax + 1 + 12 and ints[2 * bmax + 1:used].tolist() == [b for row in tables for b in row]


def _assert_same_or_tie(a, b, label):
    """Greedy tokens equal, or where they first part the eager run's top two were a tie."""
    for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)):
        if x != y:
            top = sorted(a.logprobs[i].values(), reverse=True)
            assert top[0] - top[1] < 1e-2, f"{label}: token {i} differs ({x} vs {y}) and is no tie"
            return
    assert len(a.token_ids) == len(b.token_ids)


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", [None, "gptq"])
@pytest.mark.parametrize("max_num_batched_tokens", [2048, 48])  # 48: chunked prompts beside decodes
def test_graph_replay_matches_eager(tmp_path, quantization, max_num_batched_tokens):
    from llmctl.llm import LLM

    recipe = tmp_path / "small.yaml"
    recipe.write_text(ARCH_RECIPE)
    gen = torch.Generator().manual_seed(0)
    # 622 prompt tokens: one step of them replays the 768-token bucket (above the old 512 limit)
    lengths = (5, 37, 100, 16, 64, 400)
    prompts = [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in lengths]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)
    runs = {}
    for eager in (True, False):
        llm = LLM(str(recipe), load_format="dummy", quantization=quantization, device="cuda",
                  enforce_eager=eager, max_num_seqs=8, kv_cache_memory="64MiB",
                  max_num_batched_tokens=max_num_batched_tokens)
        graphs = llm.engine.runner.decode_graphs
        prefill = llm.engine.runner.prefill_graphs
        assert (graphs is None) == eager and (prefill is None) == eager
        # 6 prompts together, then 3 alone: batches of 6 and 3 replay the padded buckets 8 and 4.
        runs[eager] = llm.generate(prompts, params) + llm.generate(prompts[:3], params)
        if not eager:
            assert graphs.sizes == [1, 2, 4, 8] and prefill.seq_sizes == [1, 2, 4, 8]
            assert prefill.max_tokens == min(max_num_batched_tokens, 2048)
            if max_num_batched_tokens > 622:  # each call's prompts in one replayed prefill step
                assert 768 in prefill.token_sizes
                assert graphs.num_replays >= 2 * 39 and prefill.num_replays == 2
            else:  # 622 prompt tokens in chunks of at most 48, beside decodes
                assert prefill.num_replays >= sum(lengths) // 48 + 1
        llm.shutdown()
    for i, (a, b) in enumerate(zip(runs[True], runs[False])):
        _assert_same_or_tie(a.outputs[0], b.outputs[0], f"request {i}")


@pytest.mark.gpu
def test_gptq_engine_allocates_one_split_k_scratch_before_its_memory_plan(tmp_path, monkeypatch):
    """The GPTQ kernels' split-K scratch exists before the engine measures its memory (so the KV
    plan counts it), is shared by every layer, and is zero again after bf16 steps."""
    from llmctl.engine.llm_engine import LLMEngine
    from llmctl.llm import LLM

    seen = {}
    plan = LLMEngine._plan_kv_cache

    def spy(engine):
        methods = {id(m.linear_method): m.linear_method for m in engine.model.modules() if hasattr(m, "linear_method")}
        seen["scratch"] = [getattr(m, "scratch", None) for m in methods.values()]
        return plan(engine)

    monkeypatch.setattr(LLMEngine, "_plan_kv_cache", spy)
    recipe = tmp_path / "small.yaml"
    recipe.write_text(ARCH_RECIPE)
    llm = LLM(str(recipe), load_format="dummy", quantization="gptq", device="cuda", dtype="bfloat16",
              max_num_seqs=8, kv_cache_memory="64MiB")
    (scratch,) = seen["scratch"]  # one linear method, one scratch, allocated before the plan
    assert scratch is not None and scratch.max_cols == 2 * 512 and scratch.max_rows == 256
    llm.generate([list(range(3, 40))], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert float(scratch.sums.abs().sum()) == 0.0
    llm.shutdown()


@pytest.mark.gpu
def test_bf16_gptq_graphs_of_a_bucket_above_the_token_budget(tmp_path):
    """A token budget of 6 with 6 sequences captures the decode bucket 8: the split-K scratch holds
    the bucket's rows (it is sized for every split-K product, not for the budget)."""
    from llmctl.llm import LLM

    recipe = tmp_path / "small.yaml"
    recipe.write_text(ARCH_RECIPE)
    llm = LLM(str(recipe), load_format="dummy", quantization="gptq", device="cuda", dtype="bfloat16",
              max_num_seqs=6, max_num_batched_tokens=6, kv_cache_memory="64MiB")
    assert llm.engine.runner.decode_graphs.sizes == [1, 2, 4, 8]
    outs = llm.generate([list(range(3, 12)), list(range(20, 25))],
                        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [4, 4]
    llm.shutdown()
