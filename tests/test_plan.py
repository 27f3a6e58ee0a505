"""`llmctl plan` end to end: numbers on the Llama-3-8B recipe, errors, and no torch."""

import json
import subprocess
import sys
from pathlib import Path

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "llama3-8b.yaml")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmctl", "plan", *args], capture_output=True, text=True)


def test_plan_llama3_8b_recipe_json_numbers_by_hand():
    res = _plan(RECIPE, "--json", "--kv-cache-memory", "16GiB")
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["kv_bytes_per_token"] == 131_072
    assert plan["num_params"] == 8_030_261_248
    assert plan["weight_bytes_fp16"] == 16_060_522_496
    assert plan["num_blocks"] == 8192 and plan["num_tokens"] == 131_072
    assert plan["max_model_len"] == 8192 and plan["max_concurrency"] == 16.0
    assert plan["tp_verdict"] == "fits"


def test_plan_table_flags_wasteful_tensor_parallelism():
    res = _plan(RECIPE, "--tensor-parallel-size", "2", "--gpu-memory", "80GiB")
    assert res.returncode == 0, res.stderr
    assert "KV bytes per token" in res.stdout and "131,072" in res.stdout
    assert "wasteful" in res.stdout


def test_plan_error_when_no_sequence_fits():
    res = _plan(RECIPE, "--device", "cpu", "--kv-cache-memory", "64MiB")
    assert res.returncode == 1
    assert "max_model_len=8,192" in res.stderr and "--max-model-len to 512" in res.stderr


def test_plan_loads_no_weights_and_no_torch():
    code = ("import sys; from typer.testing import CliRunner; from llmctl.cli.main import app; "
            f"r = CliRunner().invoke(app, ['plan', {RECIPE!r}, '--json']); "
            "assert r.exit_code == 0, r.output; print('torch' in sys.modules)")
    res = _run(code)
    assert res.stdout.strip() == "False", res.stderr


def test_plan_bad_model_dir_is_a_clear_error(tmp_path):
    res = _plan(str(tmp_path / "nope"))
    assert res.returncode == 1 and "does not exist" in res.stderr


def test_plan_of_a_recipe_puts_its_quantized_form_beside_the_dense_model():
    res = _plan(RECIPE, "--json", "--gpu-memory", "24GiB")
    assert res.returncode == 0, res.stderr
    dense = json.loads(res.stdout)
    quantized = dense["quantized"]
    assert dense["weight_format"] == "bfloat16" and quantized["weight_format"] == "GPTQ 4-bit g128"
    assert quantized["weight_bytes_loaded"] < dense["weight_bytes_loaded"] / 2.5
    assert quantized["num_blocks"] > 2 * dense["num_blocks"] > 0
    table = _plan(RECIPE, "--gpu-memory", "24GiB", "--tensor-parallel-size", "2")
    assert table.returncode == 0, table.stderr
    assert "bfloat16" in table.stdout and "GPTQ 4-bit g128" in table.stdout and "wasteful" in table.stdout


def test_plan_on_the_cpu_says_gptq_is_dequantized_at_load():
    res = _plan(str(Path(RECIPE).with_name("smollm2-135m.yaml")), "--json", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    quantized = json.loads(res.stdout)["quantized"]
    assert quantized["weight_format"] == "GPTQ 4-bit g64 -> float32 at load (CPU)"
