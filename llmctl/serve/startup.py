"""What the server says about itself at start: the KV plan, and for a GPTQ checkpoint the
accuracy check `llmctl quantize` stored beside it (`llmctl_eval.json`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llmctl.config import EVAL_FILE, read_gptq_config


@dataclass(frozen=True)
class QuantCheck:
    """`passed` is None when there is nothing to say (not a GPTQ checkpoint)."""

    is_gptq: bool
    passed: bool | None
    lines: list[str]


def _passed(report: dict) -> bool | None:
    for key in ("passed", "pass", "ok"):
        if isinstance(report.get(key), bool):
            return report[key]
    status = report.get("status") or report.get("verdict")
    if isinstance(status, str):
        return status.lower() in ("pass", "passed", "ok")
    return None


def _flat_numbers(report: dict, prefix: str = "") -> list[str]:
    """`name: value` for the numbers in the report (a nested dict is flattened one level)."""
    out = []
    for key, value in report.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out.append(f"{prefix}{key}: {value:.4g}" if isinstance(value, float) else f"{prefix}{key}: {value}")
        elif isinstance(value, dict) and not prefix:
            out.extend(_flat_numbers(value, f"{key}."))
    return out


def quant_check(model_dir: Path | None) -> QuantCheck:
    if model_dir is None or not Path(model_dir).is_dir():
        return QuantCheck(False, None, [])
    quant = read_gptq_config(model_dir)
    if quant is None:
        return QuantCheck(False, None, [])
    head = f"GPTQ {quant.bits}-bit, group size {quant.group_size}, desc_act={quant.desc_act}, sym={quant.sym}"
    report_path = Path(model_dir) / EVAL_FILE
    if not report_path.is_file():
        return QuantCheck(True, False, [head, f"WARNING: no accuracy check ({EVAL_FILE} is missing): this checkpoint was "
                                              "never compared with its original (`llmctl quantize` without --no-eval writes it)"])
    try:
        report = json.loads(report_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return QuantCheck(True, False, [head, f"WARNING: {report_path} is unreadable ({err})"])
    passed = _passed(report) if isinstance(report, dict) else None
    numbers = _numbers(report) if isinstance(report, dict) else []
    failing = report.get("failing") if isinstance(report, dict) else None
    why = f": {'; '.join(map(str, failing))}" if isinstance(failing, list) and failing else \
        ": this checkpoint is worse than its gate allows"
    verdict = {True: "accuracy check: PASSED", False: f"WARNING: accuracy check FAILED{why}",
               None: f"WARNING: {EVAL_FILE} states no verdict"}[passed]
    return QuantCheck(True, passed, [head, verdict, *numbers])


# the numbers worth a line at start, from an `llmctl eval` report's metrics
_KEY_METRICS = ("ppl_base", "ppl", "ppl_increase", "kld_mean", "same_top1", "cloze_acc", "cloze_recovery")


def _numbers(report: dict) -> list[str]:
    metrics = report.get("metrics")
    if isinstance(metrics, dict):
        keys = [k for k in _KEY_METRICS if isinstance(metrics.get(k), (int, float))]
        keys += [k for k in metrics if k.endswith("_recovery") and k not in keys]
        return [f"{k}: {metrics[k]:.4g}" for k in keys][:8]
    return _flat_numbers(report)[:8]
