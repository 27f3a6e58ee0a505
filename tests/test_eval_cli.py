"""`llmctl eval` end to end on a tiny Llama and its GPTQ checkpoint: exit codes of the gate,
the report serve reads, and one clear error for each bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from llmctl.errors import ConfigError
from llmctl.eval.gate import EXIT_GATE_FAILED

_FAST = ["--tasks", "ppl,kld", "--num-windows", "2", "--window-len", "64", "--device", "cpu", "--no-cache"]


def _eval(*args: str):
    from typer.testing import CliRunner

    from llmctl.cli.main import app

    return CliRunner().invoke(app, ["eval", *args])


@pytest.fixture()
def gptq_copy(tiny_gptq_dir, tmp_path):
    path = tmp_path / "q4"
    shutil.copytree(tiny_gptq_dir, path)
    return path


def test_gate_pass_exits_0_and_writes_the_report_serve_reads(tiny_llama_dir, gptq_copy):
    from llmctl.serve.startup import quant_check

    result = _eval("-b", str(tiny_llama_dir), str(gptq_copy), *_FAST, "--max-ppl-increase", "1", "--min-top1", "0",
                   "--max-kld", "5", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    cand = report["candidates"][0]
    assert report["passed"] is True and cand["passed"] is True
    assert {c["metric"] for c in cand["checks"]} == {"ppl_increase", "kld_mean", "same_top1"}
    saved = json.loads((gptq_copy / "llmctl_eval.json").read_text())
    assert saved["metrics"] == cand["metrics"] and saved["baseline"]["model_dir"] == str(tiny_llama_dir)
    assert saved["dataset"]["windows_sha256"] == report["dataset"]["windows_sha256"]
    check = quant_check(gptq_copy)
    assert check.passed is True and any(line.startswith("kld_mean:") for line in check.lines)


def test_gate_fail_exits_with_its_own_code_and_serve_shows_the_failing_metric(tiny_llama_dir, gptq_copy, tmp_path):
    from llmctl.serve.startup import quant_check

    out = tmp_path / "report.json"
    result = _eval("-b", str(tiny_llama_dir), str(gptq_copy), *_FAST, "--max-kld", "0", "--output-json", str(out))
    assert result.exit_code == EXIT_GATE_FAILED not in (1, 2)
    assert "gate FAILED" in result.stderr and "kld_mean" in result.stderr
    assert "FAIL" in result.stdout  # the table's verdict row
    report = json.loads(out.read_text())
    assert report["passed"] is False and report["candidates"][0]["failing"][0].startswith("kld_mean")
    check = quant_check(gptq_copy)
    assert check.passed is False and "FAILED: kld_mean" in check.lines[1]


def test_a_checkpoint_is_checked_again_with_the_gate_it_records(tiny_llama_dir, gptq_copy):
    """`quantize` checks with its recipe's gate and records it in llmctl_eval.json; a later
    `llmctl eval` of that checkpoint applies the same thresholds, not the defaults (the README's
    walk passed at quantize and failed at eval), and a flag still overrides them."""
    recorded = {"max_ppl_increase": None, "max_kld": 0.0, "min_top1_agreement": None, "min_recovery": None}
    (gptq_copy / "llmctl_eval.json").write_text(json.dumps({"passed": True, "thresholds": recorded}))
    shown = _eval("-b", str(tiny_llama_dir), str(gptq_copy), "--show-config")
    assert shown.exit_code == 0 and "checkpoint" in shown.stdout
    result = _eval("-b", str(tiny_llama_dir), str(gptq_copy), *_FAST)
    assert result.exit_code == EXIT_GATE_FAILED, result.output
    assert "kld_mean" in result.stderr  # the recorded KLD gate; the defaults have none
    saved = json.loads((gptq_copy / "llmctl_eval.json").read_text())
    assert saved["thresholds"] == recorded  # recorded again as it was checked
    result = _eval("-b", str(tiny_llama_dir), str(gptq_copy), *_FAST, "--max-kld", "50", "--json")
    assert result.exit_code == 0, result.output
    assert [c["metric"] for c in json.loads(result.stdout)["candidates"][0]["checks"]] == ["kld_mean"]


def test_no_baseline_means_no_gate(tiny_llama_dir):
    result = _eval(str(tiny_llama_dir), "--tasks", "ppl", "--num-windows", "2", "--window-len", "64",
                   "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] is None and report["candidates"][0]["metrics"]["num_tokens"] == 126


def _copy_with(src, dst, config=None, swap_tokens=False):
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    if swap_tokens:
        tok = json.loads((dst / "tokenizer.json").read_text())
        vocab = tok["model"]["vocab"]
        a, b = "the", "Ġthe"
        vocab[a], vocab[b] = vocab[b], vocab[a]
        (dst / "tokenizer.json").write_text(json.dumps(tok))
    return dst


@pytest.mark.parametrize("case", ["vocab", "tokenizer"])
def test_a_baseline_with_another_vocabulary_is_refused(tiny_llama_dir, tmp_path, case):
    other = _copy_with(tiny_llama_dir, tmp_path / "other", config={"vocab_size": 49153} if case == "vocab" else None,
                       swap_tokens=case == "tokenizer")
    result = _eval("-b", str(other), str(tiny_llama_dir), *_FAST)
    assert isinstance(result.exception, ConfigError)
    expected = "vocabulary of 49152 tokens" if case == "vocab" else "maps tokens to ids differently"
    assert expected in str(result.exception)


def test_a_dataset_too_short_for_the_windows_is_refused(tiny_llama_dir, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("Only a few words here.")
    result = _eval(str(tiny_llama_dir), "--tasks", "ppl", "--dataset", str(text), "--window-len", "64",
                   "--device", "cpu")
    assert isinstance(result.exception, ConfigError)
    assert "short.txt has 6 tokens; 16 window(s) of 64" in str(result.exception)
    assert "--num-windows" in result.exception.hint  # the flag that sets how many, a real one


def test_a_device_that_is_not_here_is_refused_before_anything_loads(tiny_llama_dir, monkeypatch):
    import torch

    from llmctl.eval import scoring_run

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr(scoring_run, "ModelRun", None)  # nothing may load a model before the check
    result = _eval(str(tiny_llama_dir), "--tasks", "ppl", "--device", "cuda")
    assert isinstance(result.exception, ConfigError)
    assert "CUDA is not available" in str(result.exception) and result.exception.hint == "use --device cpu"


def test_an_unknown_task_is_one_red_line_and_exit_1(tiny_llama_dir):
    proc = subprocess.run([sys.executable, "-m", "llmctl", "eval", str(tiny_llama_dir), "--tasks", "ppl,hellaswag"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "unknown task 'hellaswag'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("content, message", [
    ('{"question": "a?", "choices": ["x", "y"], "answer": 0}\n{"question": "b?", "choices": ["x"}\n',
     "line 2 is not JSON"),
    ('{"question": "a?", "choices": ["x", "y"], "answer": 0}\n{"question": "b?", "choices": ["x", "y"], "answer": 5}\n',
     "document 2: answer 5 is outside the 2 choices"),
    ('{"question": "a?", "choices": "xy", "answer": 0}\n', "document 1: needs 'choices'"),
])
def test_a_malformed_local_task_names_the_line(tiny_llama_dir, tmp_path, content, message):
    task = tmp_path / "mine.jsonl"
    task.write_text(content)
    result = _eval(str(tiny_llama_dir), "--tasks", str(task), "--device", "cpu")
    assert isinstance(result.exception, ConfigError) and message in str(result.exception)


def test_kld_without_a_baseline_is_refused(tiny_llama_dir):
    result = _eval(str(tiny_llama_dir), "--tasks", "kld")
    assert isinstance(result.exception, ConfigError) and "kld compares with a baseline" in str(result.exception)


def test_a_torn_or_disagreeing_recorded_gate_sets_no_thresholds(tmp_path):
    from llmctl.eval.plan import recorded_gate

    a, b, torn = tmp_path / "a", tmp_path / "b", tmp_path / "torn"
    for d in (a, b, torn):
        d.mkdir()
    gate = {"max_ppl_increase": 0.35, "max_kld": None, "min_top1_agreement": 0.7, "min_recovery": None}
    (a / "llmctl_eval.json").write_text(json.dumps({"thresholds": gate}))
    (b / "llmctl_eval.json").write_text(json.dumps({"thresholds": {**gate, "max_ppl_increase": 0.05}}))
    (torn / "llmctl_eval.json").write_text('{"thresholds": {"max_kld"')
    assert recorded_gate((str(a), str(torn))) == {"eval.max_ppl_increase": 0.35, "eval.max_kld": None,
                                                  "eval.min_top1_agreement": 0.7, "eval.min_recovery": None}
    assert recorded_gate((str(a), str(b))) == {}  # two gates: neither applies
    assert recorded_gate((str(torn), "default")) == {}
