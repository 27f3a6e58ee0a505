"""The eval report: one JSON document for the whole run, and per candidate checkpoint the
`llmctl_eval.json` that `llmctl serve` reads at start (its verdict, failing metrics and numbers)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

from llmctl.config import EVAL_FILE
from llmctl.eval import gate


def _device_name(identity: dict) -> str:
    device = identity.get("device", "")
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU"


def _dataset(plan, windows) -> dict | None:
    if windows is None:
        return None
    return {"source": windows.source, "window_len": int(windows.ids.shape[1]),
            "stride": plan.config.stride or int(windows.ids.shape[1]), "num_windows": int(windows.ids.shape[0]),
            "num_scored_tokens": windows.num_scored, "windows_sha256": windows.digest()}


def _thresholds(config) -> dict:
    return {"max_ppl_increase": config.max_ppl_increase, "max_kld": config.max_kld,
            "min_top1_agreement": config.min_top1_agreement, "min_recovery": config.min_recovery}


def candidate_report(plan, run, base, dataset: dict | None) -> dict:
    passed = gate.verdict(run.checks)
    return {
        "model": run.name, "identity": run.identity, "passed": passed, "failing": gate.failing(run.checks),
        "metrics": run.metrics, "checks": [c.to_dict() for c in run.checks], "thresholds": _thresholds(plan.config),
        "baseline": None if base is None else {**base.identity, "cache": base.cache},
        "dataset": dataset, "tasks": list(run.tasks), "details": run.details, "seconds": round(run.seconds, 2),
        "device": _device_name(run.identity), "dtype": run.identity.get("dtype"),
        "llmctl_version": _version(),
    }


def _version() -> str:
    from llmctl.version import __version__

    return __version__


def build_report(plan, windows, base, runs, seconds: float) -> dict:
    dataset = _dataset(plan, windows)
    candidates = [candidate_report(plan, run, base, dataset) for run in runs]
    verdicts = [c["passed"] for c in candidates if c["passed"] is not None]
    report = {
        "llmctl_version": _version(), "passed": all(verdicts) if verdicts else None,
        "baseline": None if base is None else {"model": base.name, **base.identity, "metrics": base.metrics,
                                               "cache": base.cache, "seconds": round(base.seconds, 2)},
        "dataset": dataset, "tasks": list(plan.tasks), "thresholds": _thresholds(plan.config),
        "candidates": candidates, "seconds": round(seconds, 2),
    }
    # per-token arrays stay out of the JSON; plots read them from the runs
    report["_runs"] = runs
    return report


def public(report: dict) -> dict:
    return {k: v for k, v in report.items() if not k.startswith("_")}


def write_checkpoint_reports(report: dict) -> list[Path]:
    """`llmctl_eval.json` into every candidate that is a GPTQ checkpoint dir (what serve loads)."""
    written = []
    for cand in report["candidates"]:
        model_dir = cand["identity"].get("model_dir")
        if model_dir and (Path(model_dir) / "quantize_config.json").is_file():
            path = Path(model_dir) / EVAL_FILE
            path.write_text(json.dumps(cand, indent=2, default=str))
            written.append(path)
    return written


def exit_code(report: dict) -> int:
    return gate.EXIT_GATE_FAILED if report["passed"] is False else 0
