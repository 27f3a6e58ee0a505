"""`llmctl models`: the default model's cache and a local dir's description, from config.json only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM


def run_cli(*args: str, home: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    if home is not None:
        env["LLMCTL_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "llmctl", "models", *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def gptq_like_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dense tiny checkpoint carrying a GPTQ quantize_config.json: `models` reads configs only."""
    path = tmp_path_factory.mktemp("tiny")
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(path)
    (path / "quantize_config.json").write_text(json.dumps(
        {"bits": 4, "group_size": 16, "desc_act": True, "sym": False, "checkpoint_format": "gptq_v2"}))
    return path


def test_default_model_in_its_cache(default_model_dir: Path) -> None:
    res = run_cli("--json", home=default_model_dir.parent.parent)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["converted"] is True and info["cache_dir"] == str(default_model_dir)
    assert info["source_gguf"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert info["size_bytes"] > 500_000_000
    assert info["model"]["num_hidden_layers"] == 30 and info["model"]["quantization"] is None


def test_default_model_not_converted_yet(tmp_path: Path) -> None:
    res = run_cli(home=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "SmolLM2-135M-Instruct" in res.stdout and "converted" in res.stdout and "no (" in res.stdout
    assert str(tmp_path / "models" / "SmolLM2-135M-Instruct") in res.stdout
    assert not (tmp_path / "models" / "SmolLM2-135M-Instruct").exists()  # looking does not convert


def test_local_dir_description(gptq_like_dir: Path) -> None:
    res = run_cli(str(gptq_like_dir), "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert (info["architecture"], info["num_hidden_layers"], info["hidden_size"]) == ("LlamaForCausalLM", 3, 32)
    assert (info["num_attention_heads"], info["num_key_value_heads"], info["vocab_size"]) == (4, 2, 128)
    # Parameters counted from the config agree with the tensors actually saved.
    model = LlamaForCausalLM.from_pretrained(gptq_like_dir)
    assert info["num_params"] == sum(p.numel() for p in model.parameters())
    assert info["quantization"] == {"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": True,
                                    "sym": False, "checkpoint_format": "gptq_v2"}
    assert info["weights_bytes"] == (gptq_like_dir / "model.safetensors").stat().st_size


def test_local_dir_table(gptq_like_dir: Path) -> None:
    res = run_cli(str(gptq_like_dir))
    assert res.returncode == 0, res.stderr
    assert "gptq 4-bit, group size 16, desc_act=True, sym=False, format gptq_v2" in res.stdout
    assert "4 / 2 / 8" in res.stdout  # heads / kv heads / head dim


def test_errors_are_one_red_line(tmp_path: Path) -> None:
    res = run_cli(str(tmp_path / "missing"))
    assert res.returncode == 1
    assert "error:" in res.stderr and "does not exist" in res.stderr and "Traceback" not in res.stderr
    res = run_cli(str(tmp_path))
    assert res.returncode == 1 and "has no config.json" in res.stderr
