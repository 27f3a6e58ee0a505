"""Interop with GPTQModel 7.6.0 (the `interop` extra), both ways, and with transformers'
GPTQ loader (optimum over GPTQModel), on a shrunk random Llama.

GPTQModel's CPU kernel runs in fp16/bf16 only, so logits are compared by relative
error: a wrong bit layout or zero offset moves weights by whole quantization steps
and the logits by far more than half-precision rounding does.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from llmctl.config import GPTQConfig, QuantConfig

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def tiny_llama_dir(default_model_dir, tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, initializer_range=0.1)
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, path / name)
    return path


def _ids() -> torch.Tensor:
    return torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(5))


def _gptqmodel_logits(gptqmodel, path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = gptqmodel.GPTQModel.load(str(path), device="cpu", backend=gptqmodel.BACKEND.TORCH, dtype=torch.float16)
    with torch.no_grad():
        return model.model(ids).logits.float()


def _llmctl_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from llmctl.models.loader import load_model

    return load_model(path, dtype="float32", device="cpu").logits(ids)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("overrides", [dict(), dict(desc_act=True)])
def test_gptqmodel_loads_what_llmctl_writes(gptqmodel, tiny_llama_dir, tmp_path, overrides):
    from llmctl.quant.run import quantize_checkpoint

    out = tmp_path / "llmctl-gptq"
    quantize_checkpoint(tiny_llama_dir, out, QuantConfig(GPTQConfig(group_size=32, **overrides), num_samples=4, seq_len=64),
                        device="cpu", run_eval=False)
    ids = _ids()
    ours, theirs = _llmctl_logits(out, ids), _gptqmodel_logits(gptqmodel, out, ids)
    assert _relative_error(theirs, ours) < 5e-3
    # The check discriminates: the unquantized model is much further away.
    assert _relative_error(_llmctl_logits(tiny_llama_dir, ids), ours) > 10 * _relative_error(theirs, ours)


def test_llmctl_loads_what_gptqmodel_writes(gptqmodel, tiny_llama_dir, tmp_path):
    from llmctl.models.loader import load_tokenizer
    from llmctl.quant.calibration import calibration_batch, load_calibration_texts

    calib = calibration_batch(load_tokenizer(tiny_llama_dir), load_calibration_texts(None), 4, 64)
    qcfg = gptqmodel.QuantizeConfig(bits=4, group_size=32, sym=True)
    model = gptqmodel.GPTQModel.load(str(tiny_llama_dir), qcfg, device="cpu")
    model.quantize([{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in calib], batch_size=1)
    out = tmp_path / "gptqmodel-gptq"
    model.save(str(out))
    ids = _ids()
    ours, theirs = _llmctl_logits(out, ids), _gptqmodel_logits(gptqmodel, out, ids)
    assert _relative_error(theirs, ours) < 5e-3
    assert _relative_error(_llmctl_logits(tiny_llama_dir, ids), ours) > 10 * _relative_error(theirs, ours)


def test_transformers_loads_what_llmctl_writes(gptqmodel, optimum, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers import GPTQConfig as HFGPTQConfig

    from llmctl.quant.run import quantize_checkpoint

    out = tmp_path / "llmctl-gptq"
    quantize_checkpoint(tiny_llama_dir, out, QuantConfig(GPTQConfig(group_size=32), num_samples=4, seq_len=64),
                        device="cpu", run_eval=False)
    # transformers reads config.json's quantization_config; backend="torch" picks GPTQModel's
    # plain dequantizing kernel (its CPU default, TorchAtenLinear, adds ~1e-2 of its own error).
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16, device_map="cpu",
                                                 quantization_config=HFGPTQConfig(bits=4, backend="torch"))
    assert type(model.model.layers[0].self_attn.q_proj).__module__.startswith("gptqmodel")
    ids = _ids()
    with torch.no_grad():
        theirs = model(ids).logits.float()
    ours = _llmctl_logits(out, ids)
    assert _relative_error(theirs, ours) < 5e-3
    assert _relative_error(_llmctl_logits(tiny_llama_dir, ids), ours) > 10 * _relative_error(theirs, ours)
