"""Stops through the engine: every EOS id the model's files name ends a sequence,
generation_config.json's sampling fields are the request defaults, and a SentencePiece
completion keeps the leading space its first token carries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmctl.sampling_params import SamplingParams

PROMPT = "The capital of France is"


def _model_dir_with(default_model_dir: Path, tmp_path: Path, generation_config: dict) -> Path:
    """The default model (weights linked, not copied) with another generation_config.json."""
    out = tmp_path / "model"
    out.mkdir()
    for f in default_model_dir.iterdir():
        if f.name != "generation_config.json":
            (out / f.name).symlink_to(f)
    (out / "generation_config.json").write_text(json.dumps(generation_config))
    return out


def _engine(model_dir: Path, **kw):
    from llmctl.config import CacheConfig, EngineConfig, ModelConfig
    from llmctl.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=ModelConfig(model=str(model_dir), max_model_len=128),
                                  cache=CacheConfig(kv_cache_memory=8 * 2**20)), **kw)


def _run(engine, prompt, params):
    engine.add_request("r", prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                return out


@pytest.fixture(scope="module")
def greedy_reference(default_model_dir):
    engine = _engine(default_model_dir)
    assert engine.eos_token_ids == (2,)
    out = _run(engine, PROMPT, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    return out.outputs[0].token_ids


def test_a_model_with_two_eos_ids_stops_on_either(default_model_dir, tmp_path, greedy_reference):
    second_eos = greedy_reference[4]
    assert 2 not in greedy_reference[:5] and second_eos not in greedy_reference[:4]
    engine = _engine(_model_dir_with(default_model_dir, tmp_path, {"eos_token_id": [2, second_eos]}))
    assert engine.eos_token_ids == (2, second_eos)
    out = _run(engine, PROMPT, SamplingParams(temperature=0.0, max_tokens=12)).outputs[0]
    assert out.token_ids == greedy_reference[:5]
    assert (out.finish_reason, out.stop_reason) == ("stop", None)
    tokenizer = engine.tokenizer
    assert out.text == tokenizer.decode(greedy_reference[:4])  # the EOS itself is not shown
    # min_tokens holds back every EOS id, the second one included
    held = _run(engine, PROMPT, SamplingParams(temperature=0.0, max_tokens=8, min_tokens=8)).outputs[0]
    assert len(held.token_ids) == 8 and second_eos not in held.token_ids and 2 not in held.token_ids


def test_generation_config_sampling_is_the_default(default_model_dir, tmp_path, greedy_reference):
    from llmctl.config import ServeConfig
    from llmctl.llm import LLM
    from llmctl.serve.launcher import build_app
    from llmctl.serve.protocol import CompletionRequest

    model_dir = _model_dir_with(default_model_dir, tmp_path, {"eos_token_id": 2, "temperature": 0.0, "top_k": 7})
    engine = _engine(model_dir)
    assert engine.generation_defaults == {"temperature": 0.0, "top_k": 7}
    llm = LLM.__new__(LLM)
    llm.engine, llm._ids = engine, iter(range(10))
    out = llm.generate([PROMPT])[0].outputs[0]  # no SamplingParams: the model's defaults
    assert out.token_ids == greedy_reference  # greedy, 16 tokens (SamplingParams' max_tokens)
    ctx = build_app(engine, ServeConfig()).state.ctx
    ids = engine.tokenizer.encode(PROMPT)
    params = ctx.admit(ids, CompletionRequest(prompt=PROMPT), 4, None)
    assert (params.temperature, params.top_k) == (0.0, 7)
    explicit = ctx.admit(ids, CompletionRequest(prompt=PROMPT, temperature=0.5, top_k=3), 4, None)
    assert (explicit.temperature, explicit.top_k) == (0.5, 3)


def test_sentencepiece_completion_keeps_its_leading_space(sentencepiece_tokenizer, tmp_path):
    """A Llama-2-style tokenizer on a small random-weight model: logit_bias forces "▁Paris" as the
    first token; the completion must read " Paris" (what is appended to the prompt), as vLLM gives."""
    tok = sentencepiece_tokenizer
    model_dir = tmp_path / "sp-model"
    tok.save_pretrained(str(model_dir))
    (model_dir / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}))
    engine = _engine(model_dir, load_format="dummy")
    paris, fox = tok.convert_tokens_to_ids(["▁Paris", "▁fox"])
    params = SamplingParams(temperature=0.0, max_tokens=2, logit_bias={paris: 100.0}, ignore_eos=True)
    out = _run(engine, PROMPT, params).outputs[0]
    assert out.token_ids[0] == paris
    assert out.text.startswith(" Paris")
    params = SamplingParams(temperature=0.0, max_tokens=1, logit_bias={fox: 100.0})
    assert _run(engine, PROMPT, params).outputs[0].text == " fox"
