"""End to end on a shrunk random Llama: quantize, write, load back; atomicity; bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from llmctl.config import EvalConfig, GPTQConfig, QuantConfig
from llmctl.errors import ConfigError, LlmctlError, QuantizationError
from llmctl.eval.gate import EXIT_GATE_FAILED
from llmctl.quant.run import quantize_checkpoint


def _fake_quantized_logits(model_dir: Path, config: QuantConfig, ids: torch.Tensor) -> torch.Tensor:
    """The in-memory model after GPTQ (fake-quantized weights), with the checkpoint's fp16 extras."""
    from llmctl.models.loader import load_model, load_tokenizer
    from llmctl.quant.calibration import calibration_batch, load_calibration_texts
    from llmctl.quant.driver import quantize_model_layers

    model = load_model(model_dir, dtype="float32", device="cpu")
    calib = calibration_batch(load_tokenizer(model_dir), load_calibration_texts(config.dataset),
                              config.num_samples, config.seq_len, config.seed)
    quantize_model_layers(model, calib, config.gptq, sink=lambda *_: None)
    for name, param in model.named_parameters():
        if param.is_floating_point() and not name.endswith(("proj.weight",)):
            param.data = param.data.half().float()  # what the checkpoint stores for unquantized tensors
    return model.logits(ids)


def _digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("overrides", [
    dict(bits=4, group_size=32),
    dict(bits=3, group_size=32, sym=False, desc_act=True),
    dict(bits=8, group_size=-1, act_group_aware=False),
    dict(bits=2, group_size=64, desc_act=True, static_groups=True),
])
def test_checkpoint_loads_with_the_logits_of_the_fake_quantized_model(tiny_llama_dir, tmp_path, overrides):
    from llmctl.models.loader import load_model

    config = QuantConfig(GPTQConfig(**overrides), num_samples=4, seq_len=64)
    before = _digest(tiny_llama_dir)
    out = tmp_path / "q"
    # A tiny shard limit forces several shards plus an index.
    summary = quantize_checkpoint(tiny_llama_dir, out, config, device="cpu", run_eval=False, max_shard_bytes=100_000)
    assert _digest(tiny_llama_dir) == before  # the source is only read
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    written = json.loads((out / "config.json").read_text())
    assert written["torch_dtype"] == "float16" and written.get("dtype", "float16") == "float16"
    qcfg = written["quantization_config"]
    assert qcfg == json.loads((out / "quantize_config.json").read_text())
    assert (qcfg["bits"], qcfg["sym"], qcfg["quant_method"]) == (config.gptq.bits, config.gptq.sym, "gptq")
    assert qcfg["checkpoint_format"] == ("gptq" if config.gptq.sym else "gptq_v2")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        assert f"model.layers.1.{proj}.qweight" in index and f"model.layers.1.{proj}.g_idx" in index
    assert not any(name.endswith("proj.weight") for name in index)
    assert summary.output_bytes < summary.source_bytes

    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(3))
    loaded = load_model(out, dtype="float32", device="cpu").logits(ids)
    torch.testing.assert_close(loaded, _fake_quantized_logits(tiny_llama_dir, config, ids), rtol=1e-4, atol=1e-4)


def test_checkpoint_without_g_idx_loads_as_groups_in_order(tiny_llama_dir, tmp_path):
    """Old AutoGPTQ checkpoints without act-order may omit g_idx."""
    from safetensors.torch import load_file, save_file

    from llmctl.models.loader import load_model

    out = tmp_path / "q"
    quantize_checkpoint(tiny_llama_dir, out, QuantConfig(GPTQConfig(group_size=32), num_samples=2, seq_len=64),
                        device="cpu", run_eval=False)
    ids = torch.arange(40).reshape(2, 20)
    expected = load_model(out, dtype="float32", device="cpu").logits(ids)
    tensors = load_file(out / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith("g_idx")}, out / "model.safetensors")
    torch.testing.assert_close(load_model(out, dtype="float32", device="cpu").logits(ids), expected)


def test_a_failure_midway_leaves_no_output_dir(tiny_llama_dir, tmp_path):
    out = tmp_path / "q"

    def fail(report):
        raise RuntimeError("interrupted after layer 0")

    with pytest.raises(RuntimeError, match="interrupted"):
        quantize_checkpoint(tiny_llama_dir, out, QuantConfig(GPTQConfig(group_size=32), num_samples=2, seq_len=32),
                            device="cpu", run_eval=False, on_layer=fail)
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temp dir


def test_overwrite_replaces_an_existing_checkpoint_only_when_asked(tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    config = QuantConfig(GPTQConfig(group_size=32), num_samples=2, seq_len=32)
    quantize_checkpoint(tiny_llama_dir, out, config, device="cpu", run_eval=False)
    (out / "old.txt").write_text("old")
    with pytest.raises(QuantizationError, match="already exists"):
        quantize_checkpoint(tiny_llama_dir, out, config, device="cpu", run_eval=False)
    assert (out / "old.txt").exists()
    quantize_checkpoint(tiny_llama_dir, out, config, device="cpu", run_eval=False, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_overwrite_into_the_sources_parent_leaves_the_source_intact(tiny_llama_dir, tmp_path):
    models = tmp_path / "models"
    source = models / "tiny"
    shutil.copytree(tiny_llama_dir, source)
    (models / "notes.txt").write_text("a file beside the model")
    before = _tree(models)
    for out in (models, tmp_path, source):
        result = _cli(str(source), "-o", str(out), "--overwrite", "--group-size", "32", "--num-samples", "2",
                      "--seq-len", "32", "--no-eval", "--device", "cpu")
        assert isinstance(result.exception, QuantizationError), result.output
        assert ("contains the source" in str(result.exception)) or ("is the source" in str(result.exception))
        assert _tree(models) == before


def test_overwrite_refuses_a_dir_that_is_not_a_checkpoint(tiny_llama_dir, tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    result = _cli(str(tiny_llama_dir), "-o", str(out), "--overwrite", "--group-size", "32", "--num-samples", "2",
                  "--seq-len", "32", "--no-eval", "--device", "cpu")
    assert isinstance(result.exception, QuantizationError) and "not a GPTQ checkpoint" in str(result.exception)
    assert (out / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_checkpoint_is_written_with_the_users_umask(tiny_llama_dir, tmp_path, umask, dir_mode, file_mode):
    import os

    old = os.umask(umask)
    try:
        out = tmp_path / "q"
        quantize_checkpoint(tiny_llama_dir, out, QuantConfig(GPTQConfig(group_size=32), num_samples=2, seq_len=32),
                            device="cpu", run_eval=False)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == dir_mode
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {file_mode}, modes


def test_dataset_is_local_only(tmp_path, monkeypatch):
    import datasets

    from llmctl.quant.calibration import check_dataset, load_calibration_texts

    def no_hub(*args, **kwargs):
        raise AssertionError(f"datasets.load_dataset called with {args}")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    for name in ("wikitext", "allenai/c4", str(tmp_path / "missing")):
        with pytest.raises(ConfigError, match="does not exist") as info:
            load_calibration_texts(name)
        assert str(Path(name).expanduser()) in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=f"directory {empty} holds no"):
        check_dataset(str(empty))


def test_dataset_directory_reads_its_files(tmp_path):
    from llmctl.quant.calibration import load_calibration_texts

    data = tmp_path / "data"
    (data / "more").mkdir(parents=True)
    (data / "a.jsonl").write_text('{"text": "first document"}\n{"text": "second document"}\n')
    (data / "more" / "b.jsonl").write_text('{"text": "third document"}\n')
    assert sorted(load_calibration_texts(str(data))) == ["first document", "second document", "third document"]


def test_quantize_check_is_llmctl_eval_and_writes_llmctl_eval_json(tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    summary = quantize_checkpoint(tiny_llama_dir, out, QuantConfig(GPTQConfig(group_size=32), num_samples=2, seq_len=64),
                                  device="cpu", eval_config=EvalConfig(num_windows=2, window_len=64))
    report = json.loads((out / "llmctl_eval.json").read_text())
    assert report == json.loads(json.dumps(summary.eval, default=str))
    metrics = report["metrics"]
    assert metrics["num_tokens"] == 2 * 63 and metrics["ppl"] > 1 and metrics["ppl_base"] > 1
    assert 0 <= metrics["same_top1"] <= 1 and metrics["kld_mean"] > 0
    assert report["baseline"]["model_dir"] == str(tiny_llama_dir) and report["identity"]["quantization"]["bits"] == 4
    assert isinstance(report["passed"], bool) and [c["metric"] for c in report["checks"]] == ["ppl_increase",
                                                                                              "same_top1"]
    # the summary's time is the whole run, the check included, with its stages
    assert list(summary.stage_seconds) == ["load", "calibration", "gptq", "write", "check"]
    assert summary.seconds >= sum(summary.stage_seconds.values()) - 0.05
    assert summary.seconds > report["quantize_seconds"]


def test_the_default_model_picks_its_recipe():
    result = _cli("default", "-o", "unused", "--show-config")
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "group_size" in line)
    assert "64" in row and "recipe" in row
    result = _cli("default", "-o", "unused", "--show-config", "--group-size", "32")
    row = next(line for line in result.output.splitlines() if "group_size" in line)
    assert "32" in row and "flag" in row


def _cli(*args: str):
    from typer.testing import CliRunner

    from llmctl.cli.main import app

    return CliRunner().invoke(app, ["quantize", *args])


@pytest.mark.parametrize("args, error, message", [
    (["--group-size", "128"], QuantizationError, "group_size 128 does not divide in_features 64"),
    (["--bits", "5"], ConfigError, "bits: must be 2, 3, 4 or 8"),
    (["--dataset", "missing/calib.jsonl"], ConfigError, "does not exist"),
    (["--damp-percent", "1.5"], ConfigError, "damp_percent"),
])
def test_bad_input_fails_before_any_work(tiny_llama_dir, tmp_path, args, error, message):
    result = _cli(str(tiny_llama_dir), "-o", str(tmp_path / "q"), *args)
    assert isinstance(result.exception, error) and message in str(result.exception)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_and_quantized_source_are_refused(tiny_llama_dir, tmp_path):
    (tmp_path / "q").mkdir()
    result = _cli(str(tiny_llama_dir), "-o", str(tmp_path / "q"), "--group-size", "32")
    assert isinstance(result.exception, QuantizationError) and "--overwrite" in result.exception.hint
    result = _cli(str(tiny_llama_dir), "-o", str(tiny_llama_dir / "inside"), "--group-size", "32")
    assert isinstance(result.exception, LlmctlError) and "inside the source" in str(result.exception)


def test_cli_quantizes_and_prints_a_json_summary(tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    result = _cli(str(tiny_llama_dir), "-o", str(out), "--group-size", "32", "--num-samples", "2",
                  "--seq-len", "32", "--bits", "4", "--desc-act", "--no-eval", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.exception
    summary = json.loads(result.stdout)
    assert summary["output"] == str(out.resolve()) and summary["eval"] is None
    assert summary["compression"] > 1 and len(summary["layer_losses"]) == 2
    assert json.loads((out / "quantize_config.json").read_text())["desc_act"] is True


# A random tiny Llama is nearly flat, so its gate is tight: 8 bits keep every top-1 token, 2 bits lose some.
_GATE_RECIPE = """
quantize: {group_size: 32, num_samples: 2, seq_len: 64}
eval: {num_windows: 2, window_len: 64, max_ppl_increase: 0.01, min_top1_agreement: 0.99}
"""


@pytest.mark.parametrize("bits, exit_code", [(8, 0), (2, EXIT_GATE_FAILED)])
def test_a_checkpoint_below_its_gate_fails_the_command(tiny_llama_dir, tmp_path, bits, exit_code):
    recipe = tmp_path / "gate.yaml"
    recipe.write_text(_GATE_RECIPE)
    out = tmp_path / "q"
    result = _cli(str(tiny_llama_dir), "-o", str(out), "--recipe", str(recipe), "--bits", str(bits), "--device", "cpu")
    report = json.loads((out / "llmctl_eval.json").read_text())  # written either way, to look at
    assert result.exit_code == exit_code, (result.output, report)
    assert report["passed"] is (exit_code == 0)
    if exit_code:
        assert "accuracy gate FAILED" in result.stderr and report["failing"], result.stderr
