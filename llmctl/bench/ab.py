"""A/B of several servers in one run: the same workload, split into rounds, each round
sent to every target in turn (the order reversed every other round: A B, B A, ...) so that
noise of a shared machine falls on all of them. Each metric is given per target, with
the ratio to the first target and a paired bootstrap confidence interval of that ratio
(requests resampled by index for latencies, rounds for throughput)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from llmctl.bench.client import RequestResult
from llmctl.bench.metrics import measured_window, summarize

NUM_BOOTSTRAP = 1000
# (metric key, how to get one request's value or None for throughput, stat).
LATENCY = {"ttft": lambda r: r.ttft, "tpot": lambda r: r.tpot, "e2el": lambda r: r.latency}
COMPARED = [("request_throughput", None, None), ("output_throughput", None, None)] + [
    (f"{stat}_{name}_ms", name, stat) for name in ("ttft", "tpot", "e2el") for stat in ("mean", "median", "p99")]


@dataclass
class TargetRuns:
    """One target's results over the rounds of an A/B run."""

    url: str
    results: list[RequestResult] = field(default_factory=list)
    round_windows: list[float] = field(default_factory=list)  # seconds measured per round
    round_tokens: list[tuple[int, int]] = field(default_factory=list)  # (requests, output tokens) per round
    stopped: str | None = None

    def add_round(self, results: list[RequestResult], stopped: str | None) -> None:
        self.results += results
        self.round_windows.append(measured_window(results))
        done = [r for r in results if r.success and r.counted]
        self.round_tokens.append((len(done), sum(r.output_len for r in done)))
        self.stopped = self.stopped or stopped

    def summary(self, **kw) -> dict:
        return summarize(self.results, duration=sum(self.round_windows), **kw)


def round_slices(n: int, rounds: int) -> list[slice]:
    rounds = max(1, min(rounds, n))
    edges = np.linspace(0, n, rounds + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def round_order(k: int, num_targets: int) -> list[int]:
    order = list(range(num_targets))
    return order if k % 2 == 0 else order[::-1]


def _stat(values: np.ndarray, stat: str) -> float:
    return float({"mean": np.mean, "median": np.median, "p99": lambda v: np.percentile(v, 99)}[stat](values))


def _paired(a: TargetRuns, b: TargetRuns, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Values of requests both targets completed, in index order (ms)."""
    get = LATENCY[name]
    va = {r.index: get(r) for r in a.results if r.success and r.counted and get(r) is not None}
    vb = {r.index: get(r) for r in b.results if r.success and r.counted and get(r) is not None}
    common = sorted(va.keys() & vb.keys())
    return np.array([va[i] for i in common]) * 1000.0, np.array([vb[i] for i in common]) * 1000.0


def _throughput(t: TargetRuns, idx: np.ndarray, key: str) -> float:
    col = 0 if key == "request_throughput" else 1
    secs = np.asarray(t.round_windows)[idx].sum()
    return float(np.asarray(t.round_tokens)[idx, col].sum() / secs) if secs > 0 else float("nan")


def ratio_ci(a: TargetRuns, b: TargetRuns, key: str, name: str | None, stat: str | None,
             seed: int = 0) -> tuple[float | None, float | None]:
    """The 2.5th and 97.5th percentiles of b/a over paired bootstrap resamples."""
    rng = np.random.default_rng([seed, 0xAB])
    if name is None:
        n = min(len(a.round_windows), len(b.round_windows))
        if n < 2:
            return None, None
        draws = [rng.integers(0, n, n) for _ in range(NUM_BOOTSTRAP)]
        ratios = [_throughput(b, i, key) / _throughput(a, i, key) for i in draws]
    else:
        va, vb = _paired(a, b, name)
        if va.size < 2:
            return None, None
        draws = [rng.integers(0, va.size, va.size) for _ in range(NUM_BOOTSTRAP)]
        ratios = [_stat(vb[i], stat) / _stat(va[i], stat) for i in draws]
    ratios = np.asarray(ratios, float)
    ratios = ratios[np.isfinite(ratios)]
    if ratios.size == 0:
        return None, None
    return float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


def compare(runs: Sequence[TargetRuns], summaries: Sequence[dict], seed: int = 0) -> list[dict]:
    """One row per metric and non-baseline target: both values, the ratio, its CI."""
    rows = []
    base, base_s = runs[0], summaries[0]
    for other, other_s in zip(runs[1:], summaries[1:]):
        for key, name, stat in COMPARED:
            a, b = base_s.get(key), other_s.get(key)
            ratio = b / a if a and b is not None else None
            low, high = ratio_ci(base, other, key, name, stat, seed) if ratio is not None else (None, None)
            rows.append({"metric": key, "baseline": base.url, "target": other.url, "a": a, "b": b,
                         "ratio": ratio, "ci_low": low, "ci_high": high})
    return rows
