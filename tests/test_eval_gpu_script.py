"""benchmarks/eval_gpu.py at a shrunk Llama shape on the CPU: the script the GPU run executes
goes through every stage (llmctl baseline and GPTQ candidate passes, exact whole-row passes,
transformers' passes) and its llmctl-vs-transformers check holds on the same weights."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_eval_gpu_script_runs_every_stage_at_a_tiny_shape(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("eval_gpu", ROOT / "benchmarks" / "eval_gpu.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "eval_gpu.txt"
    monkeypatch.setattr(sys, "argv", ["eval_gpu.py", "--tiny", "--device", "cpu", "--num-windows", "2",
                                      "--exact-windows", "1", "--check-windows", "1", "--out", str(out)])
    assert script.main() == 0
    text = out.read_text()
    for row in ("llmctl baseline pass", "llmctl candidate pass (GPTQ W4A16", "llmctl eval exact, both passes",
                "transformers both models + exact KLD"):
        assert row in text, row
    # fp32 on the CPU: the engine's rows equal transformers' forward of the same weights
    diff = float(re.search(r"max \|diff\| ([0-9.e+-]+), mean", text).group(1))
    assert diff < 1e-4 and "PASS" in text
    # exact KLD is never below the top-K one (the log-sum inequality), per token
    assert float(re.search(r"exact - top-K: mean [0-9.e+-]+, min ([0-9.e+-]+)", text).group(1)) >= -1e-9
