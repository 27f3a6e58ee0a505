"""Drawing for A/B runs and sweeps of `llmctl bench serve`: one table for the whole run
(a row per point and target; the ratio to the first target with its 95% bootstrap
interval), the best rate under the SLO, the files."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

from llmctl.cli.bench_serve_run import LiveProgress, write_outputs

_COLUMNS = (("completed", "ok", "{:.0f}"), ("failed", "fail", "{:.0f}"), ("request_throughput", "req/s", "{:.2f}"),
            ("output_throughput", "out tok/s", "{:.1f}"), ("median_ttft_ms", "TTFT p50", "{:.0f}"),
            ("p99_ttft_ms", "TTFT p99", "{:.0f}"), ("median_tpot_ms", "TPOT p50", "{:.1f}"),
            ("p99_tpot_ms", "TPOT p99", "{:.1f}"))


def _cell(value, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def letters(report: dict) -> dict[str, str]:
    """A, B, C... for the targets, in the order given (A is the baseline)."""
    return {url: chr(ord("A") + i) for i, url in enumerate(report["targets"])}


def points_table(report: dict, title: str):
    from rich.table import Table

    names = letters(report)
    legend = "; ".join(f"{k} = {u}" for u, k in names.items())
    table = Table(title=title, caption=legend, title_justify="left", caption_justify="left")
    for head in ("point", "", *(c[1] for c in _COLUMNS)):
        table.add_column(head, justify="left" if head in ("point", "") else "right", no_wrap=head == "point")
    for row in report["rows"]:
        point = row["point"] + (" (stopped)" if row.get("stopped_early") else "")
        table.add_row(point, names[row["base_url"]], *(_cell(row.get(k), f) for k, _, f in _COLUMNS))
    return table


def notes(report: dict) -> list[str]:
    """Why a point stopped, and its most frequent failure, one line each."""
    names = letters(report)
    out = []
    for row in report["rows"]:
        where = f"{row['point']} {names[row['base_url']]}"
        if row.get("stopped_early"):
            out.append(f"{where}: {row['stopped_early']}")
        for e in row.get("errors", [])[:1]:
            out.append(f"{where}: {e['count']} failed, HTTP {e['status']}: {e['message']}")
    return out


# A sweep's comparison, per point: the metrics a capacity question turns on (the JSON has all).
SWEEP_COMPARED = ("request_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms")


def comparison_table(rows: list[dict]):
    """One row per metric (and per point of a sweep, whose rows carry `point`)."""
    from rich.table import Table

    table = Table(title="A/B: target / baseline (95% bootstrap interval)", title_justify="left")
    names = {rows[0]["baseline"]: "A"} | {t: chr(ord("B") + i) for i, t in enumerate(dict.fromkeys(c["target"] for c in rows))}
    by_point = "point" in rows[0]
    for head in ("point",) * by_point + ("metric", "A", "other", "ratio", "95% CI"):
        table.add_column(head, justify="left" if head in ("point", "metric") else "right", no_wrap=head == "point")
    for c in rows:
        ci = f"{c['ci_low']:.3f} - {c['ci_high']:.3f}" if c["ci_low"] is not None else "-"
        table.add_row(*([c["point"]] if by_point else []), c["metric"], _cell(c["a"], "{:.2f}"),
                      f"{names[c['target']]} {_cell(c['b'], '{:.2f}')}", _cell(c["ratio"], "{:.3f}x"), ci)
    return table


def sweep_comparison(report: dict) -> list[dict]:
    return [{**c, "point": r["point"]} for r in report["rows"] for c in r.get("comparison", [])
            if c["metric"] in SWEEP_COMPARED]


def print_best(report: dict, console) -> None:
    slo = report.get("slo_ms") or {}
    limits = ", ".join(f"p99 {k.upper()} <= {v:g} ms" for k, v in slo.items())
    for url, best in (report.get("best") or {}).items():
        if best is None:
            console.print(f"{url}: no rate tried meets {limits}")
        else:
            console.print(f"{url}: highest rate meeting {limits}: [bold]{best['request_rate']:.3g} req/s[/] "
                          f"(p99 TTFT {_cell(best['p99_ttft_ms'], '{:.0f}')} ms, "
                          f"p99 TPOT {_cell(best['p99_tpot_ms'], '{:.1f}')} ms)")


def _finish(report: dict, output_json: Path | None, output_csv: Path | None, plot_dir: Path | None, as_json: bool,
            err, title: str) -> None:
    from rich.console import Console

    from llmctl.bench.serve_report import to_json

    write_outputs(report, output_json, output_csv, err)
    if plot_dir is not None:
        from llmctl.bench.plots import plot_run, plot_sweep

        if report["mode"] == "ab":
            by_target = {u: {"requests": [r for r in report["requests"] if r["target"] == u]} for u in report["targets"]}
            paths = plot_run(by_target, plot_dir)
        else:
            paths = plot_sweep(report, plot_dir)
        for path in paths:
            err.print(f"wrote {path}")
    if as_json:
        print(to_json(report))
        return
    out = Console()
    out.print(points_table(report, title))
    for line in notes(report):
        out.print(line, markup=False, highlight=False)
    comparison = report.get("comparison") or sweep_comparison(report)
    if comparison:
        out.print(comparison_table(comparison))
    print_best(report, out)


def run_ab_command(cfg, urls: list[str], rounds: int, output_json, output_csv, plot_dir, as_json: bool, err) -> None:
    from llmctl.bench.sweep import run_ab

    with LiveProgress(err) as live:
        report = asyncio.run(run_ab(cfg, urls, rounds, on_event=live))
    _finish(report, output_json, output_csv, plot_dir, as_json, err, f"A/B in {rounds} alternating rounds")


def run_sweep_command(cfg, sweep, urls: list[str], output_json, output_csv, plot_dir, as_json: bool) -> None:
    from rich.console import Console

    from llmctl.bench.sweep import run_sweep

    err = Console(stderr=True)
    with LiveProgress(err) as live:
        report = asyncio.run(run_sweep(cfg, sweep, urls, on_event=live))
    _finish(report, output_json, output_csv, plot_dir, as_json, err, f"Sweep ({report['mode']})")
