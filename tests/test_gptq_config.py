"""The one GPTQ config: it round-trips the files AutoGPTQ and GPTQModel write, and one reader
decides which file of a checkpoint dir counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmctl.config import GPTQConfig, read_gptq_config
from llmctl.errors import ConfigError, ModelLoadError

# quantize_config.json as AutoGPTQ 0.7 writes it (damp 0.1, act-order on, no act_group_aware).
AUTOGPTQ = {"bits": 4, "group_size": 128, "damp_percent": 0.1, "desc_act": True, "static_groups": False, "sym": True,
            "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model",
            "quant_method": "gptq", "checkpoint_format": "gptq"}
# AutoGPTQ before 0.7: no quant_method, no checkpoint_format.
AUTOGPTQ_OLD = {"bits": 4, "group_size": 64, "damp_percent": 0.01, "desc_act": False, "sym": True,
                "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model"}
# GPTQModel keeps damping, ordering and true_sequential under `meta`.
GPTQMODEL = {"bits": 4, "group_size": 32, "desc_act": False, "sym": False, "lm_head": False, "quant_method": "gptq",
             "checkpoint_format": "gptq_v2", "pack_dtype": "int32",
             "meta": {"quantizer": ["gptqmodel:7.6.0"], "uri": "https://github.com/modelcloud/gptqmodel",
                      "damp_percent": 0.05, "damp_auto_increment": 0.01, "static_groups": False,
                      "true_sequential": False, "mse": 0.0, "act_group_aware": True}}
_KEYS = ("bits", "group_size", "desc_act", "sym", "checkpoint_format")


@pytest.mark.parametrize("written", [AUTOGPTQ, AUTOGPTQ_OLD, GPTQMODEL], ids=["autogptq", "autogptq-old", "gptqmodel"])
def test_round_trip_of_what_autogptq_and_gptqmodel_write(written):
    config = GPTQConfig.from_dict(written)
    again = config.to_dict()
    assert GPTQConfig.from_dict(json.loads(json.dumps(again))) == config
    assert {k: again[k] for k in _KEYS} == {k: written.get(k, "gptq") for k in _KEYS}
    assert again["quant_method"] == "gptq" and again["pack_dtype"] == "int32"
    meta = written.get("meta", {})
    assert config.damp_percent == written.get("damp_percent", meta.get("damp_percent"))
    assert config.true_sequential == written.get("true_sequential", meta.get("true_sequential"))
    # A file that says nothing about act_group_aware came from a quantizer without it.
    assert config.act_group_aware == meta.get("act_group_aware", False)


def test_fields_and_derived_values():
    v1, v2 = GPTQConfig.from_dict(AUTOGPTQ), GPTQConfig.from_dict(GPTQMODEL)
    assert (v1.zero_offset, v2.zero_offset) == (1, 0)
    assert GPTQConfig(bits=3).maxq == 7
    # Act-order replaces the group-aware ordering, as in GPTQModel.
    assert GPTQConfig(desc_act=True).act_group_aware is False and GPTQConfig().act_group_aware is True


@pytest.mark.parametrize("bad, field", [({"bits": 5}, "bits"), ({"group_size": 100}, "group_size"),
                                        ({"checkpoint_format": "marlin"}, "checkpoint_format"),
                                        ({"quant_method": "awq"}, "quantization method 'awq'")])
def test_bad_values_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        GPTQConfig.from_dict({**AUTOGPTQ, **bad})


def _model_dir(tmp_path: Path, config_json: dict | None, quantize_config: dict | None) -> Path:
    if config_json is not None:
        (tmp_path / "config.json").write_text(json.dumps(config_json))
    if quantize_config is not None:
        (tmp_path / "quantize_config.json").write_text(json.dumps(quantize_config))
    return tmp_path


def test_config_json_wins_over_quantize_config_json(tmp_path):
    model_dir = _model_dir(tmp_path, {"quantization_config": GPTQMODEL}, AUTOGPTQ)
    assert read_gptq_config(model_dir) == GPTQConfig.from_dict(GPTQMODEL)


def test_quantize_config_json_alone_and_dense(tmp_path):
    assert read_gptq_config(_model_dir(tmp_path, {"hidden_size": 8}, None)) is None
    assert read_gptq_config(_model_dir(tmp_path, {"hidden_size": 8}, AUTOGPTQ_OLD)) == GPTQConfig.from_dict(AUTOGPTQ_OLD)


def test_a_bad_file_names_itself(tmp_path):
    model_dir = _model_dir(tmp_path, {"quantization_config": {**AUTOGPTQ, "bits": 5}}, None)
    with pytest.raises(ModelLoadError, match=r"config.json: bits: must be 2, 3, 4 or 8"):
        read_gptq_config(model_dir)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        read_gptq_config(model_dir)
