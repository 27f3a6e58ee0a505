"""lm-evaluation-harness against the server: `local-completions` (echo + logprobs over
token-id prompts) must choose the same answer per question as lm-eval's own `hf` model on
the same weights. A 100-question MMLU task from the embedded file, as a local YAML task.

Run with `pytest -m interop tests/test_serve_interop.py` (needs `pip install -e .[interop]`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

# 400 scored requests to the server, then lm-eval's hf model on the same questions: about
# 4 CPU-minutes; a shared or slower runner gets room past the suite's 600 s default.
pytestmark = [pytest.mark.interop, pytest.mark.slow, pytest.mark.timeout(1800)]

NUM_QUESTIONS = 100
TASK = "llmctl_mmlu100"
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: label
metric_list:
  - metric: acc
"""


def write_mmlu_task(folder: Path, num_questions: int = NUM_QUESTIONS) -> Path:
    """Every k-th question of the file (so many subjects appear), header rows dropped."""
    from llmctl.paths import mmlu_jsonl

    rows = [json.loads(line) for line in mmlu_jsonl().read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["correct_answer"] != "answer"]
    step = len(rows) // num_questions
    picked = rows[::step][:num_questions]
    data = folder / "mmlu100.jsonl"
    with open(data, "w") as fh:
        for r in picked:
            doc = {"question": r["question"], "subject": r["topic"],
                   "choices": [r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"]],
                   "label": "ABCD".index(r["correct_answer"])}
            fh.write(json.dumps(doc) + "\n")
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data))
    return folder


def _choices(results: dict) -> dict[int, int]:
    """doc_id -> index of the highest-loglikelihood choice."""
    out = {}
    for sample in results["samples"][TASK]:
        lls = [resp[0][0] for resp in sample["resps"]]
        out[sample["doc_id"]] = max(range(len(lls)), key=lls.__getitem__)
    return out


def _evaluate(model: str, model_args: dict, task_dir: Path, batch_size: int) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, model_args=model_args, tasks=[TASK], batch_size=batch_size,
                           task_manager=TaskManager(include_path=str(task_dir)), log_samples=True)


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("interop") / "serve.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "llmctl", "serve", str(default_model_dir), "--port", str(port),
                                 "--served-model-name", "smol", "--max-model-len", "1024", "--kv-cache-memory", "256MiB",
                                 "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        assert proc.poll() is None and time.time() < deadline, log.read_text()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.5)
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def test_local_completions_choose_what_hf_chooses(lm_eval, server, default_model_dir, tmp_path):
    task_dir = write_mmlu_task(tmp_path)
    served = _evaluate("local-completions", {
        "base_url": server + "/v1/completions", "model": "smol", "tokenizer_backend": "huggingface",
        "tokenizer": str(default_model_dir), "num_concurrent": 1, "max_retries": 1, "tokenized_requests": True,
    }, task_dir, batch_size=8)
    reference = _evaluate("hf", {"pretrained": str(default_model_dir), "dtype": "float32", "device": "cpu"},
                          task_dir, batch_size=8)
    ours, theirs = _choices(served), _choices(reference)
    assert len(ours) == len(theirs) == NUM_QUESTIONS
    agree = sum(ours[d] == theirs[d] for d in theirs)
    acc = served["results"][TASK]["acc,none"], reference["results"][TASK]["acc,none"]
    report = f"per-question agreement {agree}/{NUM_QUESTIONS}; acc served {acc[0]:.3f}, hf {acc[1]:.3f}"
    print(report)
    if os.environ.get("LLMCTL_INTEROP_REPORT"):
        Path(os.environ["LLMCTL_INTEROP_REPORT"]).write_text(report + "\n")
    assert agree == NUM_QUESTIONS, report
