"""The embedded default model: converted once from the GGUF, complete, and reused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from llmctl.models.default import (
    DEFAULT_MODEL_NAME,
    default_model_dir,
    ensure_default_model,
    is_default_model_converted,
)


def test_converted_dir_is_a_plain_fp32_llama(default_model_dir: Path) -> None:
    cfg = json.loads((default_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (30, 576, 9, 3)
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    with safe_open(str(default_model_dir / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype.is_floating_point
        assert str(f.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype()) == "F32"
    assert len(names) == 30 * 9 + 2  # 9 tensors a layer, embedding, final norm; lm_head is tied
    assert "lm_head.weight" not in names


def test_converted_dir_has_tokenizer_chat_template_and_generation_config(default_model_dir: Path) -> None:
    assert (default_model_dir / "tokenizer.json").is_file()
    template = (default_model_dir / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template and "add_generation_prompt" in template
    gen = json.loads((default_model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1


def test_second_call_reuses_the_conversion(default_model_dir: Path) -> None:
    weights = default_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert ensure_default_model() == default_model_dir
    assert weights.stat().st_mtime_ns == before
    assert is_default_model_converted()
    assert not list(default_model_dir.parent.glob(f".{DEFAULT_MODEL_NAME}.tmp-*"))


def test_location_follows_llmctl_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMCTL_HOME", str(tmp_path))
    assert default_model_dir() == tmp_path / "models" / DEFAULT_MODEL_NAME
    assert not is_default_model_converted()


@pytest.mark.slow
def test_concurrent_first_use_converts_once_and_atomically(tmp_path: Path) -> None:
    """Two processes race on an empty cache; a stale temp dir from a killed run is swept."""
    stale = tmp_path / "models" / f".{DEFAULT_MODEL_NAME}.tmp-killed"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    env = {**os.environ, "LLMCTL_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    code = (
        "import sys; from llmctl.models.default import ensure_default_model as e; "
        "print(e(progress=lambda msg: print('PROGRESS', msg, file=sys.stderr)))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    target = tmp_path / "models" / DEFAULT_MODEL_NAME
    assert [out.strip() for out, _ in outs] == [str(target), str(target)]
    # Exactly one of the two converted; the other waited and reused its result.
    assert sum(err.count("PROGRESS converting") > 0 for _, err in outs) == 1
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [f".{DEFAULT_MODEL_NAME}.lock", DEFAULT_MODEL_NAME]
    assert (target / "model.safetensors").stat().st_size > 500_000_000
