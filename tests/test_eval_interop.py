"""`llmctl eval` on an lm-eval task YAML picks the same MMLU answers, question by question, as
lm-eval's own `hf` model on the same weights and the same local questions.

Run with `pytest -m interop tests/test_eval_interop.py` (needs `make setup-interop`).
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.interop, pytest.mark.slow]

NUM_QUESTIONS = 40


def test_llmctl_eval_picks_what_lm_eval_hf_picks(lm_eval, default_model_dir, tmp_path):
    from test_serve_interop import TASK, _choices, _evaluate, write_mmlu_task

    from llmctl.config import EvalConfig
    from llmctl.eval.run import EvalPlan, evaluate

    task_dir = write_mmlu_task(tmp_path, NUM_QUESTIONS)
    reference = _evaluate("hf", {"pretrained": str(default_model_dir), "dtype": "float32", "device": "cpu"},
                          task_dir, batch_size=8)
    theirs = _choices(reference)
    plan = EvalPlan(candidates=(str(default_model_dir),), tasks=(str(task_dir / f"{TASK}.yaml"),),
                    config=EvalConfig(), engine_args={"device": "cpu", "dtype": "float32"})
    ours = evaluate(plan)["candidates"][0]
    picks = ours["details"][TASK]["picks"]
    assert len(picks) == len(theirs) == NUM_QUESTIONS
    agree = sum(picks[d] == theirs[d] for d in theirs)
    acc = ours["metrics"][f"{TASK}_acc"], reference["results"][TASK]["acc,none"]
    assert agree == NUM_QUESTIONS, f"agreement {agree}/{NUM_QUESTIONS}; acc llmctl {acc[0]:.3f}, hf {acc[1]:.3f}"
    assert acc[0] == pytest.approx(acc[1])
