from pathlib import Path

import pytest

from llmctl.errors import ConfigError
from llmctl.recipe import load_recipe, recipe_from_dict
from llmctl.units import parse_size

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.mark.parametrize("name", ["smollm2-135m.yaml", "llama3-8b.yaml"])
def test_shipped_recipes_load(name):
    recipe = load_recipe(RECIPES / name)
    assert recipe.name == name.removesuffix(".yaml")


def test_default_recipe_uses_group_size_64():
    recipe = load_recipe(RECIPES / "smollm2-135m.yaml")
    assert recipe.model.model == "default"
    assert recipe.quant.gptq.group_size == 64
    assert 576 % recipe.quant.gptq.group_size == 0
    assert recipe.cache.kv_cache_memory == 2**30


def test_llama3_recipe_carries_real_shapes():
    from llmctl.models.arch import arch_from_config

    arch = arch_from_config(load_recipe(RECIPES / "llama3-8b.yaml").model.arch)
    assert (arch.num_hidden_layers, arch.num_key_value_heads, arch.head_dim) == (32, 8, 128)
    assert arch.kv_bytes_per_token(2) == 2 * 32 * 8 * 128 * 2 == 131_072
    assert 8.0e9 < arch.num_params() < 8.1e9


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"quantize": {"group_size": 100}}, "quantize.group_size"),
        ({"quantize": {"bits": 5}}, "quantize.bits"),
        ({"quantize": {"bits": "four"}}, "quantize.bits"),
        ({"quantize": {"groupsize": 128}}, "quantize.groupsize"),
        ({"cache": {"block_size": 12}}, "cache.block_size"),
        ({"cache": {"kv_cache_memory": "lots"}}, "cache.kv_cache_memory"),
        ({"scheduler": {"max_num_seqs": 0}}, "scheduler.max_num_seqs"),
        ({"model": {"dtype": "int8"}}, "model.dtype"),
        ({"serve": {"port": 70000}}, "serve.port"),
        ({"servre": {}}, "servre"),
        ({"quantize": [1, 2]}, "quantize"),
    ],
)
def test_bad_values_name_the_field(raw, field):
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(raw)
    assert field in str(err.value)


def test_bad_inline_arch_is_rejected_where_it_is_used(tmp_path):
    from typer.testing import CliRunner

    from llmctl.cli.main import app

    recipe = tmp_path / "gpt2.yaml"
    recipe.write_text("model:\n  arch:\n    architectures: [GPT2LMHeadModel]\n")
    result = CliRunner().invoke(app, ["plan", str(recipe)])
    assert "unsupported architecture" in str(result.exception)
    with pytest.raises(ConfigError, match="model.arch must be a mapping"):
        recipe_from_dict({"model": {"arch": [1, 2]}})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("quantize: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)


@pytest.mark.parametrize("text, value", [("80GiB", 80 * 2**30), ("1.5GB", 1_500_000_000), ("512MiB", 2**29), (4096, 4096)])
def test_parse_size(text, value):
    assert parse_size(text) == value
