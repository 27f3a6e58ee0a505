"""Our Llama-family model against transformers' modeling code (the reference).

Shrunk random configs of each architecture are written with save_pretrained and
read back through our real loader; the default model is compared in fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from llmctl.models.loader import load_model

# fp32 on the same CPU with the same op order: agreement is expected to rounding level.
FP32_TOL = 1e-5

SHRUNK = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def _configs() -> dict[str, object]:
    return {
        # original_max_position_embeddings 16 < the 48-token inputs, so the scaling is exercised.
        "llama3-rope-scaling": LlamaConfig(**SHRUNK, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False),
        "llama2-linear-rope": LlamaConfig(**SHRUNK, rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=False),
        "mistral": MistralConfig(**SHRUNK, sliding_window=None, tie_word_embeddings=False),
        "qwen2-tied": Qwen2Config(**SHRUNK, tie_word_embeddings=True),
        "llama-tied-with-bias": LlamaConfig(**SHRUNK, attention_bias=True, tie_word_embeddings=True),
    }


def _write_random(cfg, path: Path, dtype: torch.dtype = torch.float32, **save_kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            # Larger than HF's init so every layer matters to the logits; norms stay near 1.
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.08)
    ref.to(dtype).save_pretrained(path, **save_kwargs)
    # Reload rather than keep `ref`: .to(dtype) would also round HF's fp32 rotary
    # buffer, which from_pretrained keeps in fp32.
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _inputs(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (2, 48), generator=g), torch.arange(48).expand(2, 48)


@pytest.mark.parametrize("name", list(_configs()))
def test_shrunk_architectures_match_transformers(name: str, tmp_path: Path) -> None:
    cfg = _configs()[name]
    ref = _write_random(cfg, tmp_path)
    ours = load_model(tmp_path)
    assert ours.arch.architecture == type(ref).__name__
    ids, pos = _inputs(cfg.vocab_size)
    with torch.inference_mode():
        expected = ref(ids).logits.float()
        got = ours.compute_logits(ours(ids, pos))
    assert got.dtype == torch.float32
    assert expected.abs().max() > 0.5  # random weights make non-trivial logits
    torch.testing.assert_close(got, expected, atol=FP32_TOL, rtol=FP32_TOL)


def test_untied_lm_head_is_its_own_weight(tmp_path: Path) -> None:
    cfg = _configs()["mistral"]
    _write_random(cfg, tmp_path)
    ours = load_model(tmp_path)
    assert ours.lm_head.weight.data_ptr() != ours.model.embed_tokens.weight.data_ptr()
    tied = load_model(_tied_dir(tmp_path.parent / "tied"))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def _tied_dir(path: Path) -> Path:
    _write_random(_configs()["qwen2-tied"], path)
    return path


def test_sharded_checkpoint_with_index(tmp_path: Path) -> None:
    cfg = _configs()["llama3-rope-scaling"]
    ref = _write_random(cfg, tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ours = load_model(tmp_path)
    ids, pos = _inputs(cfg.vocab_size)
    with torch.inference_mode():
        torch.testing.assert_close(ours.compute_logits(ours(ids, pos)), ref(ids).logits, atol=FP32_TOL, rtol=FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints(dtype: torch.dtype, tmp_path: Path) -> None:
    cfg = _configs()["qwen2-tied"]
    ref = _write_random(cfg, tmp_path, dtype=dtype)
    ours = load_model(tmp_path)  # no dtype: the checkpoint's own
    assert ours.model.embed_tokens.weight.dtype == dtype
    assert ours.model.layers[0].self_attn.qkv_proj.weight.dtype == dtype
    ids, pos = _inputs(cfg.vocab_size)
    with torch.inference_mode():
        expected = ref(ids).logits.float()
        got = ours.compute_logits(ours(ids, pos))
    # Same ops in the same dtype (bit-identical on this CPU today); allow about one
    # ulp of the logits' magnitude for kernels that reduce in another order.
    tol = 8e-3 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


def test_dtype_is_cast_on_load(tmp_path: Path) -> None:
    _write_random(_configs()["mistral"], tmp_path)
    ours = load_model(tmp_path, dtype="bfloat16")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}


def test_flattened_tokens_equal_a_dense_batch_of_one(tmp_path: Path) -> None:
    cfg = _configs()["llama3-rope-scaling"]
    _write_random(cfg, tmp_path)
    ours = load_model(tmp_path)
    ids, pos = _inputs(cfg.vocab_size)
    with torch.inference_mode():
        dense = ours(ids[:1], pos[:1])[0]
        flat = ours(ids[0], pos[0])
    torch.testing.assert_close(flat, dense, atol=0, rtol=0)


# ---- the default model (SmolLM2-135M-Instruct) ----

@pytest.fixture(scope="module")
def hf_default_model(default_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def chat_ids(default_tokenizer) -> torch.Tensor:
    # A short system turn replaces the template's default one: a shorter prompt keeps
    # the 32 full recomputes of the generation test cheap.
    messages = [{"role": "system", "content": "Answer in detail."}, {"role": "user", "content": "Why is the sky blue?"}]
    out = default_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = out if isinstance(out, torch.Tensor) else out["input_ids"]
    assert ids.shape[0] == 1 and ids.shape[1] > 16
    return ids


def test_default_model_logits_match_transformers(default_model, hf_default_model, chat_ids) -> None:
    with torch.inference_mode():
        expected = hf_default_model(chat_ids).logits.float()
        got = default_model.logits(chat_ids)
    assert got.shape == (1, chat_ids.shape[1], 49152)
    torch.testing.assert_close(got, expected, atol=FP32_TOL, rtol=FP32_TOL)


def _greedy(model, ids: torch.Tensor, max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    """Greedy decoding recomputing the whole sequence each step (the dense path, no cache)."""
    seq = ids[0].tolist()
    new: list[int] = []
    for _ in range(max_new_tokens):
        hidden = model(torch.tensor([seq]), torch.arange(len(seq))[None])
        token = int(model.compute_logits(hidden[0, -1]).argmax())
        new.append(token)
        seq.append(token)
        if token in eos_ids:
            break
    return new


@torch.inference_mode()
def test_default_model_greedy_generation_matches_transformers(default_model, hf_default_model, chat_ids) -> None:
    eos = hf_default_model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    hf_out = hf_default_model.generate(
        chat_ids, attention_mask=torch.ones_like(chat_ids), do_sample=False, max_new_tokens=32,
        pad_token_id=hf_default_model.generation_config.pad_token_id,
    )
    expected = hf_out[0, chat_ids.shape[1]:].tolist()
    assert len(expected) == 32  # the prompt asks for a long answer: no early stop
    assert _greedy(default_model, chat_ids, 32, eos_ids) == expected
