"""PNG plots of `llmctl bench serve` (`--plot DIR`): latency CDFs of one run (TTFT, TPOT,
E2EL; one line per target, so an A/B run overlays them) and, for a sweep, throughput and
p99 latency against the offered rate. Needs matplotlib (`pip install llmctl[plot]`)."""

from __future__ import annotations

import math
from pathlib import Path

from llmctl.errors import LlmctlError

_CDF_METRICS = (("ttft", "TTFT (ms)"), ("tpot", "TPOT (ms)"), ("e2el", "E2EL (ms)"))


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise LlmctlError("--plot: needs matplotlib", hint="pip install 'llmctl[plot]' (make setup installs it)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _values(records: list[dict], name: str) -> list[float]:
    done = [r for r in records if r["success"] and not (r["warmup"] or r["disconnected"] or r["cancelled"])]
    key = {"ttft": "ttft", "tpot": "tpot", "e2el": "latency"}[name]
    return sorted(1000.0 * r[key] for r in done if r.get(key) is not None)


def plot_cdfs(groups: dict[str, list[dict]], path: Path, title: str = "") -> Path:
    """One panel per latency metric, one empirical CDF per group of request records."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (name, label) in zip(axes, _CDF_METRICS):
        for group, records in groups.items():
            xs = _values(records, name)
            if xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=group)
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "Latency CDFs")
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_run(reports: dict[str, dict], out_dir: Path) -> list[Path]:
    """Latency CDFs of one run or an A/B run (targets overlaid)."""
    groups = {label: rep["requests"] for label, rep in reports.items()}
    return [plot_cdfs(groups, out_dir / "latency_cdf.png", "Latency CDFs: " + " vs ".join(groups))]


def plot_sweep(report: dict, out_dir: Path) -> list[Path]:
    """Throughput and p99 TTFT / TPOT against the offered rate (or concurrency), a line per
    target; then the latency CDFs of every point, overlaid."""
    plt = _pyplot()
    rows = report["rows"]
    by_conc = report["mode"] == "concurrencies"
    xlabel = "max concurrency" if by_conc else "offered request rate (req/s)"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("output_throughput", "output tokens/s"), ("p99_ttft_ms", "p99 TTFT (ms)"), ("p99_tpot_ms", "p99 TPOT (ms)"))
    names = target_names(report)
    for ax, (key, label) in zip(axes, panels):
        for url in report["targets"]:
            pts = sorted((_x(r, by_conc), r.get(key)) for r in rows if r["base_url"] == url and _x(r, by_conc) is not None
                         and r.get(key) is not None)
            if pts:
                line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=names[url])[0]
                stopped = [(_x(r, by_conc), r.get(key)) for r in rows if r["base_url"] == url and r.get("stopped_early")
                           and _x(r, by_conc) is not None and r.get(key) is not None]
                if stopped:  # over-saturated: stopped early, a lower bound of the real latency
                    ax.plot(*zip(*stopped), linestyle="none", marker="x", markersize=12, color=line.get_color())
        limit = (report.get("slo_ms") or {}).get(key.split("_")[1])
        if limit and key != "output_throughput":
            ax.axhline(limit, color="red", linestyle="--", linewidth=1, label=f"SLO {limit:g} ms")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Sweep ({report['mode']})")
    fig.tight_layout()
    paths = [_save(fig, plt, out_dir / "sweep.png")]
    groups: dict[str, list[dict]] = {}
    for rec in report["requests"]:
        short = names[rec["target"]].split(" (")[0]
        groups.setdefault(f"{rec['point']} {short}" if len(report["targets"]) > 1 else rec["point"], []).append(rec)
    paths.append(plot_cdfs(groups, out_dir / "latency_cdf.png", "Latency CDFs per point"))
    return paths


def target_names(report: dict) -> dict[str, str]:
    """"A fp16 (http://...)": the letter of the tables, the served model, the URL."""
    models = {r["base_url"]: r.get("model_id") for r in report["rows"]}
    return {url: f"{chr(ord('A') + i)} {models.get(url) or ''} ({url})".replace("  ", " ")
            for i, url in enumerate(report["targets"])}


def _x(row: dict, by_conc: bool) -> float | None:
    value = row.get("max_concurrency") if by_conc else row.get("request_rate")
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None
