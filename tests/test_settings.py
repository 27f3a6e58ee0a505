"""One resolver for every command: a flag beats the recipe, the recipe beats the default, and
`--show-config` says which gave each value, the same way on serve, bench throughput, plan
and quantize."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from llmctl.cli.main import app
from llmctl.errors import ConfigError
from llmctl.settings import DEFAULT, FLAG, RECIPE, engine_flags, is_recipe, resolve

RECIPE_TEXT = """\
name: small
model:
  path: default
  dtype: float32
  max_model_len: 512
quantize:
  group_size: 64
  num_samples: 8
cache:
  block_size: 32
  kv_cache_memory: 64MiB
"""


@pytest.fixture()
def recipe(tmp_path):
    (tmp_path / "small.yaml").write_text(RECIPE_TEXT)
    return str(tmp_path / "small.yaml")


def test_flag_beats_recipe_beats_default(recipe):
    s = resolve(recipe, {"cache.block_size": 64, "model.dtype": None, "quantize.bits": 8})
    assert (s.value("cache.block_size"), s.source("cache.block_size")) == (64, FLAG)
    assert (s.value("model.dtype"), s.source("model.dtype")) == ("float32", RECIPE)  # None: not given
    assert (s.value("cache.kv_cache_memory"), s.source("cache.kv_cache_memory")) == (64 << 20, RECIPE)
    assert (s.value("scheduler.max_num_seqs"), s.source("scheduler.max_num_seqs")) == (128, DEFAULT)
    assert s.source("model.model") == RECIPE and s.engine.model.model == "default"
    quant = s.quant
    assert (quant.gptq.bits, quant.gptq.group_size, quant.num_samples, quant.seq_len) == (8, 64, 8, 2048)
    assert s.engine.cache.block_size == 64 and s.engine.model.max_model_len == 512


def test_model_argument_beside_a_recipe(recipe):
    s = resolve("some/dir", {"cache.kv_cache_memory": "2GiB"}, recipe=recipe)
    assert s.engine.model.model == "some/dir" and s.source("model.model") == FLAG
    assert s.engine.cache.kv_cache_memory == 2 << 30 and s.engine.cache.block_size == 32
    plain = resolve("some/dir")
    assert plain.recipe is None and {src for name, _, src in plain.rows() if name != "model.model"} == {DEFAULT}


def test_bad_input_names_the_setting(recipe):
    with pytest.raises(ConfigError, match="unknown setting.*cache.blocksize"):
        resolve(None, {"cache.blocksize": 8})
    with pytest.raises(ConfigError, match="two recipes"):
        resolve(recipe, recipe=recipe)
    with pytest.raises(ConfigError, match="cache.block_size: must be a power of two"):
        resolve(recipe, {"cache.block_size": 12}).engine
    with pytest.raises(ConfigError, match="max_num_seq: unknown engine argument"):
        engine_flags({"max_num_seq": 4})
    assert engine_flags({"max_num_seqs": 4, "dtype": "float16"}) == {"scheduler.max_num_seqs": 4, "model.dtype": "float16"}
    assert is_recipe("a/B.YML") and not is_recipe("models/yaml-model") and not is_recipe(None)


def test_secrets_do_not_show(recipe):
    rows = dict((name, value) for name, value, _ in resolve(recipe, {"serve.api_key": "s3cret"}).rows(("serve",)))
    assert rows["serve.api_key"] == "***"


def _show(*args: str) -> dict[str, str]:
    result = CliRunner().invoke(app, [*args, "--show-config"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line and not line.startswith("#")]
    return {line.split(" = ")[0].strip(): line.split(" = ", 1)[1] for line in lines}


def test_show_config_has_the_same_precedence_on_every_command(recipe):
    serve = _show("serve", recipe, "--max-model-len", "256")
    bench = _show("bench", "throughput", "--model", recipe, "--max-model-len", "256")
    plan = _show("plan", recipe, "--max-model-len", "256")
    quantize = _show("quantize", recipe, "--group-size", "32")
    for shown in (serve, bench, plan):
        assert shown["model.max_model_len"] == "256  [flag]"
        assert shown["model.dtype"] == "'float32'  [recipe]"
        assert shown["cache.block_size"] == "32  [recipe]"
        assert shown["scheduler.max_num_seqs"] == "128  [default]"
        assert {k: v for k, v in shown.items() if k.split(".")[0] in ("model", "cache", "scheduler", "parallel")} == \
            {k: v for k, v in plan.items()}
    assert serve["serve.port"] == "8000  [default]" and "bench.num_prompts" not in serve
    assert bench["bench.num_prompts"] == "64  [default]" and "serve.port" not in bench
    assert quantize["quantize.group_size"] == "32  [flag]"
    assert quantize["quantize.num_samples"] == "8  [recipe]"
    assert quantize["quantize.bits"] == "4  [default]"
    assert quantize["model.model"] == "'default'  [recipe]" and "cache.block_size" not in quantize
