"""What `llmctl serve` says at start about a GPTQ checkpoint's stored accuracy check, and how
recipe values and flags combine into the server's configs."""

from __future__ import annotations

import json

import pytest

from llmctl.config import EVAL_FILE
from llmctl.errors import ConfigError
from llmctl.serve.startup import quant_check
from llmctl.settings import resolve


def _gptq_dir(tmp_path, eval_report=None, in_config_json=False):
    quant = {"bits": 4, "group_size": 64, "desc_act": False, "sym": True, "quant_method": "gptq"}
    if in_config_json:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": quant}))
    else:
        (tmp_path / "quantize_config.json").write_text(json.dumps(quant))
    if eval_report is not None:
        (tmp_path / EVAL_FILE).write_text(eval_report if isinstance(eval_report, str) else json.dumps(eval_report))
    return tmp_path


def test_plain_model_says_nothing(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    check = quant_check(tmp_path)
    assert not check.is_gptq and check.passed is None and check.lines == []


def test_missing_check_is_a_loud_warning(tmp_path):
    check = quant_check(_gptq_dir(tmp_path))
    assert check.is_gptq and check.passed is False
    assert "4-bit, group size 64" in check.lines[0]
    assert check.lines[1].startswith("WARNING") and EVAL_FILE in check.lines[1]


def test_failed_check_is_a_loud_warning(tmp_path):
    check = quant_check(_gptq_dir(tmp_path, {"passed": False, "ppl": {"baseline": 13.47, "quantized": 15.1}},
                                  in_config_json=True))
    assert check.passed is False and check.lines[1].startswith("WARNING: accuracy check FAILED")
    assert "ppl.baseline: 13.47" in check.lines and "ppl.quantized: 15.1" in check.lines


def test_passed_check_shows_its_numbers(tmp_path):
    check = quant_check(_gptq_dir(tmp_path, {"status": "pass", "kl_divergence": 0.0123, "top1_agreement": 0.93}))
    assert check.passed is True and "PASSED" in check.lines[1]
    assert "kl_divergence: 0.0123" in check.lines


def test_unreadable_check_is_a_warning(tmp_path):
    check = quant_check(_gptq_dir(tmp_path, "{not json"))
    assert check.passed is False and "unreadable" in check.lines[1]


def test_flags_override_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  path: default\ncache:\n  block_size: 32\nscheduler:\n  max_num_seqs: 8\n"
                      "serve:\n  port: 9000\n  api_key: from-recipe\n")
    settings = resolve(None, {"scheduler.max_num_seqs": 16, "serve.port": None, "serve.host": "0.0.0.0",
                              "cache.block_size": None}, recipe=str(recipe))
    engine, serve = settings.engine, settings.serve
    assert engine.cache.block_size == 32 and engine.scheduler.max_num_seqs == 16
    assert serve.port == 9000 and serve.host == "0.0.0.0" and serve.api_key == "from-recipe"
    settings = resolve("some/dir")
    assert settings.engine.model.model == "some/dir" and settings.serve.host == "127.0.0.1"
    with pytest.raises(ConfigError, match="serve.port"):
        resolve(None, {"serve.port": 70000}).serve
