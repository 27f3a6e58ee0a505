"""PNG plots of a comparison: the KLD distribution (histogram and CDF, one curve per
candidate) and top-1 agreement against the token's position in its window."""

from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        from llmctl.errors import ConfigError

        raise ConfigError("--plot: matplotlib is not installed", hint='pip install "llmctl[plot]"') from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(runs, out_dir: Path) -> list[Path]:
    """One PNG per view into out_dir; runs without per-token KLD (no baseline) are skipped."""
    runs = [r for r in runs if r.tokens is not None]
    if not runs:
        from llmctl.errors import ConfigError

        raise ConfigError("--plot: nothing to plot", hint="plots show KLD: add --baseline and the kld task")
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [_kld_distribution(plt, runs, out_dir / "kld_distribution.png"),
             _top1_by_position(plt, runs, out_dir / "top1_by_position.png")]
    plt.close("all")
    return paths


def _kld_distribution(plt, runs, path: Path) -> Path:
    fig, (hist, cdf) = plt.subplots(1, 2, figsize=(12, 4.5))
    floor = 1e-6
    top = max(float(r.tokens["kld"].max()) for r in runs)
    bins = torch.logspace(-6, max(-5.0, float(torch.log10(torch.tensor(max(top, 2 * floor))))), 60).numpy()
    for r in runs:
        kld = r.tokens["kld"].double().clamp_min(floor)
        hist.hist(kld.numpy(), bins=bins, histtype="step", linewidth=1.5, label=r.name)
        values = kld.sort().values
        cdf.plot(values.numpy(), (torch.arange(1, len(values) + 1) / len(values)).numpy(), label=r.name)
    for ax, title in ((hist, "KLD per token (histogram)"), (cdf, "KLD per token (CDF)")):
        ax.set_xscale("log")
        ax.set_xlabel("KL(baseline || candidate), nats")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    hist.set_ylabel("tokens")
    cdf.set_ylabel("share of tokens at or below")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _top1_by_position(plt, runs, path: Path, num_bins: int = 32) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in runs:
        pos, same = r.tokens["position"], r.tokens["same_top1"].double()
        edges = torch.linspace(0, int(pos.max()) + 1, num_bins + 1)
        idx = torch.bucketize(pos.double(), edges[1:-1].double())
        counts = torch.bincount(idx, minlength=num_bins).double()
        hits = torch.bincount(idx, weights=same, minlength=num_bins)
        keep = counts > 0
        centers = ((edges[:-1] + edges[1:]) / 2)[keep]
        ax.plot(centers.numpy(), (hits[keep] / counts[keep]).numpy(), marker="o", markersize=3, label=r.name)
    ax.set_xlabel("position in window (tokens)")
    ax.set_ylabel("same top-1 as the baseline")
    ax.set_title("Top-1 agreement by position")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
