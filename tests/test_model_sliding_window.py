"""Mistral's sliding window against transformers' MistralForCausalLM, past the window.

A shrunk random Mistral with an 8-token window: the dense forward and the engine's
paged path (chunked prefill, a prefix-cache hit, decode steps, all well past the
window) must give transformers' logits and greedy tokens. The same weights with the
window removed give other tokens, so the window is what the comparison checks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig

from llmctl.engine.llm_engine import LLMEngine
from llmctl.models.loader import load_model
from llmctl.sampling_params import SamplingParams

WINDOW = 8
VOCAB = 320
SHRUNK = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    # Token 2 is EOS: keep it out of the prompts (greedy output may still reach it).
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 13, 30, 30)]


@pytest.fixture(scope="module")
def mistral_dir(default_model_dir, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(MistralConfig(**SHRUNK, sliding_window=WINDOW))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            # Larger than HF's init so attention is far from uniform and the window matters.
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.3)
    path = tmp_path_factory.mktemp("mistral") / "shrunk-mistral"
    ref.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, path / name)
    return path


@pytest.fixture(scope="module")
def hf_mistral(mistral_dir):
    model = AutoModelForCausalLM.from_pretrained(mistral_dir, dtype=torch.float32).eval()
    assert model.config.sliding_window == WINDOW
    return model


@torch.inference_mode()
def _hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_window_is_read_from_config(mistral_dir):
    model = load_model(mistral_dir)
    assert model.arch.sliding_window == WINDOW
    assert {layer.self_attn.attn.sliding_window for layer in model.model.layers} == {WINDOW}


def test_dense_logits_match_transformers_past_the_window(mistral_dir, hf_mistral):
    ours = load_model(mistral_dir)
    ids = torch.tensor(_prompts()[2:])  # [2, 30]
    with torch.inference_mode():
        expected = hf_mistral(ids).logits.float()
        got = ours.logits(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_engine_greedy_matches_transformers_past_the_window(mistral_dir, hf_mistral, tmp_path):
    max_tokens = 24
    prompts = _prompts()
    prompts[3] = prompts[2][:16] + prompts[3][16:]  # shares two 8-token blocks with prompt 2: a prefix hit
    expected = [_hf_greedy(hf_mistral, p, max_tokens) for p in prompts]
    # The same weights without the window choose other tokens: the window is what is tested.
    full_dir = tmp_path / "no-window"
    shutil.copytree(mistral_dir, full_dir)
    config = json.loads((full_dir / "config.json").read_text())
    (full_dir / "config.json").write_text(json.dumps(dict(config, sliding_window=None)))
    unwindowed = AutoModelForCausalLM.from_pretrained(full_dir, dtype=torch.float32).eval()
    assert [_hf_greedy(unwindowed, p, max_tokens) for p in prompts] != expected

    # Blocks of 4 and 12-token steps: prompts are prefilled in chunks that straddle the window.
    engine = LLMEngine.from_engine_args(str(mistral_dir), dtype="float32", block_size=4, max_model_len=64,
                                        max_num_batched_tokens=12, num_gpu_blocks_override=96)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = {}
    for batch in (prompts[:3], prompts[3:]):  # the last arrives when the others' blocks are cached
        for prompt in batch:
            engine.add_request(str(prompts.index(prompt)), prompt, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                outputs[int(out.request_id)] = out
    assert engine.get_stats().prefix_cache_hits > 0
    assert [outputs[i].outputs[0].token_ids for i in range(len(prompts))] == expected


def _config(arch: str, **extra) -> dict:
    return dict(SHRUNK, architectures=[arch], num_hidden_layers=4, **extra)


@pytest.mark.parametrize("arch,extra,layers", [
    ("MistralForCausalLM", dict(sliding_window=4096), (0, 1, 2, 3)),
    ("MistralForCausalLM", dict(sliding_window=None), ()),
    ("Qwen2ForCausalLM", dict(sliding_window=4096), ()),  # use_sliding_window defaults to false
    ("Qwen2ForCausalLM", dict(sliding_window=4096, use_sliding_window=True, max_window_layers=2), (2, 3)),
    ("Qwen2ForCausalLM", dict(sliding_window=4096, use_sliding_window=True,
                              layer_types=["full_attention", "sliding_attention"] * 2), (1, 3)),
    ("LlamaForCausalLM", dict(sliding_window=4096), ()),
])
def test_which_layers_use_the_window(arch, extra, layers):
    from llmctl.models.arch import arch_from_config

    parsed = arch_from_config(_config(arch, **extra))
    assert tuple(i for i in range(4) if parsed.layer_sliding_window(i) == 4096) == layers
    assert all(parsed.layer_sliding_window(i) is None for i in range(4) if i not in layers)


@pytest.mark.parametrize("window", [0, -3, "4096", True])
def test_invalid_window_is_refused(window):
    from llmctl.errors import ModelLoadError
    from llmctl.models.arch import arch_from_config

    with pytest.raises(ModelLoadError, match="sliding_window"):
        arch_from_config(_config("MistralForCausalLM", sliding_window=window))
