"""CUDA graphs for decode steps: bucket sizes (CPU), and on a GPU (`-m gpu`) replayed steps that
give the eager engine's tokens for dense and GPTQ models, padded batches included."""

from __future__ import annotations

import pytest
import torch

from llmctl.engine.cuda_graph import capture_sizes
from llmctl.engine.sampling_params import SamplingParams

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
def test_graph_replay_matches_eager(tmp_path, quantization):
    from llmctl.llm import LLM

    recipe = tmp_path / "small.yaml"
    recipe.write_text(ARCH_RECIPE)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in (5, 37, 100, 16, 64)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)
    runs = {}
    for eager in (True, False):
        llm = LLM(str(recipe), load_format="dummy", quantization=quantization, device="cuda",
                  enforce_eager=eager, max_num_seqs=8, kv_cache_memory="64MiB")
        graphs = llm.engine.runner.decode_graphs
        assert (graphs is None) == eager
        # 5 prompts together, then 3 alone: batches of 5 and 3 replay the padded buckets 8 and 4.
        runs[eager] = llm.generate(prompts, params) + llm.generate(prompts[:3], params)
        if not eager:
            assert graphs.sizes == [1, 2, 4, 8] and graphs.num_replays >= 2 * 39
        llm.shutdown()
    for i, (a, b) in enumerate(zip(runs[True], runs[False])):
        _assert_same_or_tie(a.outputs[0], b.outputs[0], f"request {i}")
