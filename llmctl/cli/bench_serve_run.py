"""Drawing for `llmctl bench serve`: a progress bar with live throughput on stderr, the
summary table (or JSON) on stdout, the report files, and one red line when nothing worked."""

from __future__ import annotations

import asyncio
from pathlib import Path

from llmctl.cli.common import progress_bar
from llmctl.errors import LlmctlError


class LiveProgress:
    """A rich progress bar fed by the benchmark's events: completed requests, live req/s
    and output tok/s over the requests finished so far."""

    def __init__(self, console) -> None:
        self.progress = progress_bar(console, "live")
        self._tasks: dict[str, int] = {}
        self._tokens: dict[str, int] = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, event: str, info: dict) -> None:
        if event == "start":
            label = info.get("label") or info["target"]
            key = info.get("key", label)
            if key not in self._tasks:
                self._tasks[key] = self.progress.add_task(label, total=info["total"], live="")
                self._tokens[key] = 0
            else:
                self.progress.update(self._tasks[key], total=(self.progress.tasks[self._tasks[key]].total or 0)
                                     + (info["total"] or 0))
        elif event == "result":
            res, state = info["result"], info["state"]
            key = info.get("key", res.target)
            if key not in self._tasks:
                return
            if res.success:
                self._tokens[key] += res.output_len
            done = sum(r.success for r in state.finished)
            elapsed = max(state.elapsed, 1e-9)
            self.progress.update(self._tasks[key], advance=1,
                                 live=f"{done / elapsed:.2f} req/s {self._tokens[key] / elapsed:.0f} tok/s")


def write_outputs(report: dict, output_json: Path | None, output_csv: Path | None, err) -> None:
    from llmctl.bench.serve_report import write_json, write_requests_csv

    if output_json is not None:
        write_json(output_json, report)
        err.print(f"wrote {output_json}")
    if output_csv is not None:
        records = report.get("requests") or [r for t in report.get("targets", []) for r in t["requests"]]
        write_requests_csv(output_csv, records)
        err.print(f"wrote {output_csv}")


def check_any_success(report: dict) -> None:
    """A run where every request failed is an error (exit 1), with the main reason."""
    from llmctl.bench.serve_report import error_lines

    if report["completed"] == 0 and report["failed"] > 0:
        lines = error_lines(report, limit=1)
        raise LlmctlError(f"all {report['failed']} requests failed: {lines[0] if lines else 'no reason given'}",
                          hint="see `errors` in --output-json for every status and message")


def run_single(cfg, urls: list[str], ab_rounds: int, output_json: Path | None, output_csv: Path | None,
               plot_dir: Path | None, as_json: bool) -> None:
    from rich.console import Console

    from llmctl.bench.serve_report import error_lines, render_summary, to_json

    err = Console(stderr=True)
    from llmctl.bench.serve_client import run_benchmark

    with LiveProgress(err) as live:
        report = asyncio.run(run_benchmark(cfg, on_event=live))
    write_outputs(report, output_json, output_csv, err)
    if plot_dir is not None:
        from llmctl.bench.plots import plot_run

        for path in plot_run({report["base_url"]: report}, plot_dir):
            err.print(f"wrote {path}")
    if as_json:
        print(to_json(report))
    else:
        Console().print(render_summary(report))
    for line in error_lines(report):
        err.print(f"[red]failed:[/] {line}", markup=True, highlight=False)
    check_any_success(report)
