"""Model resolution and loading: each bad input gives one clear ModelLoadError naming the path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from llmctl.config import read_gptq_config
from llmctl.errors import ConfigError, ModelLoadError
from llmctl.models.loader import load_model, load_tokenizer, resolve_model_path, weight_files

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(path)
    return path


@pytest.fixture
def model_copy(tiny_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_dir, dst)
    return dst


def _rewrite_tensors(path: Path, edit) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_valid_tiny_dir_loads(tiny_dir: Path) -> None:
    model = load_model(tiny_dir)
    assert model.model.layers[1].mlp.gate_up_proj.weight.shape == (96, 32)


def test_default_and_none_resolve_to_the_converted_model(default_model_dir: Path) -> None:
    assert resolve_model_path("default") == default_model_dir
    assert resolve_model_path(None) == default_model_dir


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"nope does not exist") as err:
        resolve_model_path(str(tmp_path / "nope"))
    assert "default" in err.value.hint
    with pytest.raises(ModelLoadError, match=r"does not exist"):
        load_model(tmp_path / "nope")


def test_a_file_is_not_a_model_dir(tiny_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"config.json is not a directory"):
        resolve_model_path(str(tiny_dir / "config.json"))


def test_dir_without_config_json(model_copy: Path) -> None:
    (model_copy / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=rf"{model_copy} has no config.json"):
        load_model(model_copy)


def test_unsupported_architecture(model_copy: Path) -> None:
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"config.json: unsupported architecture 'GPT2LMHeadModel'"):
        load_model(model_copy)


def test_pickle_only_weights_are_refused(model_copy: Path) -> None:
    (model_copy / "model.safetensors").unlink()
    (model_copy / "pytorch_model.bin").write_bytes(b"not even unpickled")
    with pytest.raises(ModelLoadError, match=r"only pickle weights \(pytorch_model.bin\).*never unpickles"):
        load_model(model_copy)


def test_no_weights_at_all(model_copy: Path) -> None:
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"has no weight files"):
        load_model(model_copy)


def test_truncated_safetensors(model_copy: Path) -> None:
    file = model_copy / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=rf"{file} is not a readable safetensors file") as err:
        load_model(model_copy)
    assert "truncated" in err.value.hint


def test_shard_missing_from_index(tiny_dir: Path, tmp_path: Path) -> None:
    LlamaForCausalLM.from_pretrained(tiny_dir).save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / shard).unlink()
    with pytest.raises(ModelLoadError, match=rf"model.safetensors.index.json lists shard\(s\) that are missing: {shard}"):
        load_model(tmp_path)


def test_tensor_with_the_wrong_shape(model_copy: Path) -> None:
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite_tensors(model_copy, lambda t: t.__setitem__(name, torch.zeros(24, 32)))
    with pytest.raises(ModelLoadError, match=rf"model.safetensors: tensor {name}: .*\(24, 32\) does not match the expected \(16, 32\)"):
        load_model(model_copy)


def test_missing_tensor(model_copy: Path) -> None:
    _rewrite_tensors(model_copy, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"1 tensor\(s\) missing from the checkpoint: model.layers.0.mlp.up_proj.weight"):
        load_model(model_copy)


def test_untied_model_without_lm_head_is_missing_a_tensor(model_copy: Path) -> None:
    _rewrite_tensors(model_copy, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ModelLoadError, match=r"missing from the checkpoint: lm_head.weight"):
        load_model(model_copy)


def test_unexpected_tensor(model_copy: Path) -> None:
    _rewrite_tensors(model_copy, lambda t: t.__setitem__("model.layers.0.self_attn.extra.weight", torch.zeros(2)))
    with pytest.raises(ModelLoadError, match=r"no place for: model.layers.0.self_attn.extra.weight"):
        load_model(model_copy)


def test_bad_dtype_and_device(tiny_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"dtype: .*'float8'"):
        load_model(tiny_dir, dtype="float8")
    with pytest.raises(ConfigError, match=r"device: 'gpu0'"):
        load_model(tiny_dir, device="gpu0")


def test_unknown_quantization_method(model_copy: Path) -> None:
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"quantization method 'awq' is not supported"):
        load_model(model_copy)


def test_quantize_config_json_is_read_as_gptq(model_copy: Path) -> None:
    (model_copy / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 16, "desc_act": False, "sym": True}))
    qcfg = read_gptq_config(model_copy)
    assert qcfg is not None and qcfg.group_size == 16 and qcfg.checkpoint_format == "gptq"


def test_index_selects_files(tiny_dir: Path, tmp_path: Path) -> None:
    LlamaForCausalLM.from_pretrained(tiny_dir).save_pretrained(tmp_path, max_shard_size="20KB")
    files = weight_files(tmp_path)
    assert len(files) > 1 and all(f.name.startswith("model-") for f in files)


def test_tokenizer_has_the_chat_template(default_model_dir: Path) -> None:
    tok = load_tokenizer(default_model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhi<|im_end|>" in text


def test_tokenizer_missing_files(tiny_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match=rf"{tiny_dir}: cannot load the tokenizer"):
        load_tokenizer(tiny_dir)
