"""Drawing for `llmctl eval`: a progress bar per stage on stderr, the side-by-side table (or
JSON) on stdout, the report files; returns the exit code."""

from __future__ import annotations

import json
from pathlib import Path

from llmctl.cli.common import progress_bar

# (label, metric key, stderr key or None, format)
_ROWS = (
    ("perplexity", "ppl", None, "{:.4f}"),
    ("  95% CI", "ppl_ci95", None, "ci"),
    ("ppl increase", "ppl_increase", None, "{:+.2%}"),
    ("ln(PPL ratio)", "ln_ppl_ratio", "ln_ppl_ratio_stderr", "{:.5f}"),
    ("log-prob correlation", "logprob_correlation", None, "{:.4%}"),
    ("mean KLD", "kld_mean", "kld_stderr", "{:.5f}"),
    ("median KLD", "kld_median", None, "{:.5f}"),
    ("KLD p99", "kld_p99", None, "{:.4f}"),
    ("KLD max", "kld_max", None, "{:.3f}"),
    ("mean Δp", "dp_mean", "dp_stderr", "{:+.3%}"),
    ("RMS Δp", "dp_rms", "dp_rms_stderr", "{:.3%}"),
    ("same top-1", "same_top1", "same_top1_stderr", "{:.2%}"),
    ("cloze acc", "cloze_acc", "cloze_acc_stderr", "{:.2%}"),
    ("cloze ppl", "cloze_ppl", None, "{:.3f}"),
    ("cloze recovery", "cloze_recovery", None, "{:.2%}"),
)


def _fmt(metrics: dict, key: str, err: str | None, fmt: str) -> str:
    if key not in metrics or metrics[key] is None:
        return ""
    value = metrics[key]
    if fmt == "ci":
        return f"[{value[0]:.3f}, {value[1]:.3f}]"
    text = fmt.format(value)
    if err and metrics.get(err) is not None:
        text += " ± " + fmt.replace("+", "").format(metrics[err])
    return text


def _task_rows(report: dict) -> list[tuple]:
    keys = set()
    for c in report["candidates"]:
        keys |= {k for k in c["metrics"] if k.endswith(("_acc", "_acc_norm", "_acc_macro", "_recovery"))}
    rows = []
    for key in sorted(keys - {"cloze_acc", "cloze_recovery"}):
        err = f"{key}_stderr" if key.endswith(("_acc", "_acc_norm")) else None
        rows.append((key.replace("_", " "), key, err, "{:.2%}"))
    return rows


def print_table(report: dict, console) -> None:
    from rich.table import Table

    base = report["baseline"]
    columns = ([("baseline: " + base["model"], base["metrics"], None)] if base else [])
    columns += [(c["model"], c["metrics"], c) for c in report["candidates"]]
    table = Table(title="llmctl eval", title_style="bold")
    table.add_column("metric")
    for name, _, _ in columns:
        table.add_column(name, justify="right")
    for label, key, err, fmt in (*_ROWS, *_task_rows(report)):
        cells = [_fmt(m, key, err, fmt) for _, m, _ in columns]
        if any(cells):
            table.add_row(label, *cells)
    checks = sorted({ch["metric"] for c in report["candidates"] for ch in c["checks"]})
    for metric in checks:
        cells = []
        for _, _, cand in columns:
            ch = next((x for x in (cand or {}).get("checks", []) if x["metric"] == metric), None)
            if ch is None or ch["passed"] is None:
                cells.append("")
                continue
            mark = "[green]PASS[/]" if ch["passed"] else "[red]FAIL[/]"
            cells.append(f"{mark} ({ch['op']} {ch['threshold']:g})")
        table.add_row(f"gate: {metric}", *cells)
    verdicts = []
    for _, _, cand in columns:
        passed = None if cand is None else cand["passed"]
        verdicts.append({True: "[bold green]PASS[/]", False: "[bold red]FAIL[/]", None: ""}[passed])
    if any(verdicts):
        table.add_row("[bold]verdict[/]", *verdicts)
    seconds = [f"{base['seconds']:.1f} s"] if base else []
    table.add_row("wall time", *seconds, *(f"{c['seconds']:.1f} s" for c in report["candidates"]))
    console.print(table)
    if report["dataset"]:
        d = report["dataset"]
        console.print(f"[dim]windows: {d['num_windows']} x {d['window_len']} tokens, stride {d['stride']}, "
                      f"{d['num_scored_tokens']} scored, from {d['source']} (sha256 {d['windows_sha256'][:12]})[/]")


class _Stages:
    """A rich bar per stage; the library calls stage(label, total) and advances what it gets."""

    def __init__(self, progress) -> None:
        self.progress = progress

    def __call__(self, label: str, total: int):
        task = self.progress.add_task(label, total=total)
        return lambda k: self.progress.advance(task, k)


def run_eval_command(plan, plot: Path | None, as_json: bool, output_json: Path | None, write: bool) -> int:
    from rich.console import Console

    from llmctl.eval.report import exit_code, public, write_checkpoint_reports
    from llmctl.eval.run import evaluate

    err = Console(stderr=True, highlight=False)
    with progress_bar(err) as progress:
        report = evaluate(plan, stage=_Stages(progress))
    runs = report["_runs"]
    data = public(report)
    if output_json is not None:
        Path(output_json).write_text(json.dumps(data, indent=2, default=str))
    if write:
        for path in write_checkpoint_reports(data):
            err.print(f"[dim]wrote {path}[/]")
    if plot is not None:
        from llmctl.eval.plots import write_plots

        for path in write_plots(runs, Path(plot)):
            err.print(f"[dim]wrote {path}[/]")
    if as_json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print_table(data, Console(highlight=False))
    code = exit_code(data)
    for cand in data["candidates"]:
        if cand["passed"] is False:
            err.print(f"[bold red]gate FAILED[/] for {cand['model']}: {'; '.join(cand['failing'])} "
                      f"(exit {code})")
    return code
