"""The numbers of `llmctl bench serve`, under `vllm bench serve`'s names: request, output
and total token throughput; TTFT, TPOT, ITL and E2EL as mean / median / std and the
asked percentiles in ms; goodput under SLOs; failures by status with the server's message.

Only counted requests enter the statistics: warm-up requests, hang-ups on purpose and
requests dropped when a run is stopped early are left out. The duration is the window from
the first counted request's send to the last one's end, so warm-up time is left out too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from llmctl.bench.client import RequestResult
from llmctl.errors import ConfigError

METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_METRICS = ("ttft", "tpot", "e2el")


def parse_percentile_metrics(text: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise ConfigError(f"--percentile-metrics: a comma-separated subset of {','.join(METRICS)}, got {text!r}")
    return names


def parse_percentiles(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        values = ()
    if not values or any(not 0 <= p <= 100 for p in values):
        raise ConfigError(f"--metric-percentiles: comma-separated numbers in [0, 100], got {text!r}")
    return values


def parse_slos(items: Sequence[str], flag: str = "--goodput") -> dict[str, float]:
    """`ttft:500`, `tpot:50`, `e2el:2000` (ms) into {"ttft": 500.0, ...}."""
    slo = {}
    for item in items:
        key, _, value = item.partition(":")
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if key not in SLO_METRICS or not ms > 0:
            raise ConfigError(f"{flag}: expected ttft:MS, tpot:MS or e2el:MS with MS > 0, got {item!r}")
        slo[key] = ms
    return slo


def percentile_key(p: float) -> str:
    """vLLM's spelling: p99, p99.9."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p:g}"


def request_values(r: RequestResult) -> dict[str, float | None]:
    """One request's TTFT, TPOT and E2EL in ms (TPOT None with a single output token)."""
    tpot = r.tpot
    return {"ttft": r.ttft * 1000.0, "tpot": None if tpot is None else tpot * 1000.0, "e2el": r.latency * 1000.0}


def meets_slo(r: RequestResult, slo_ms: dict[str, float]) -> bool:
    values = request_values(r)
    return all((values[k] or 0.0) <= limit for k, limit in slo_ms.items())


def measured_window(results: Sequence[RequestResult]) -> float:
    timed = [r for r in results if not r.warmup]
    if not timed:
        return 0.0
    return max(r.end_time for r in timed) - min(r.send_time for r in timed)


def error_groups(results: Sequence[RequestResult]) -> list[dict]:
    """Failed requests grouped by (status, server message), most frequent first."""
    failed = Counter((r.status, r.error) for r in results if is_failure(r))
    return [{"status": status, "message": msg, "count": n} for (status, msg), n in failed.most_common()]


def is_failure(r: RequestResult) -> bool:
    return not (r.success or r.disconnected or r.cancelled or r.warmup)


def summarize(results: Sequence[RequestResult], percentile_metrics: Sequence[str] = METRICS,
              percentiles: Sequence[float] = (99.0,), goodput: dict[str, float] | None = None,
              duration: float | None = None) -> dict:
    """vLLM's result dictionary over the counted requests of one run (times in ms)."""
    done = [r for r in results if r.success and r.counted]
    duration = measured_window(results) if duration is None else duration
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: None)
    in_tokens, out_tokens = sum(r.prompt_len for r in done), sum(r.output_len for r in done)
    summary: dict = {
        "duration": duration, "completed": len(done), "failed": sum(is_failure(r) for r in results),
        "disconnected": sum(r.disconnected and not r.warmup for r in results),
        "cancelled": sum(r.cancelled and not r.warmup for r in results),
        "warmups": sum(r.warmup for r in results),
        "status_5xx": sum(1 for r in results if r.status is not None and r.status >= 500),
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": per_s(len(done)), "output_throughput": per_s(out_tokens),
        "total_token_throughput": per_s(in_tokens + out_tokens),
    }
    if goodput:
        summary["request_goodput"] = per_s(sum(meets_slo(r, goodput) for r in done))
        summary["goodput_slo_ms"] = dict(goodput)
    series = {"ttft": [r.ttft * 1000.0 for r in done], "tpot": [r.tpot * 1000.0 for r in done if r.tpot is not None],
              "itl": [x * 1000.0 for r in done for x in r.itl], "e2el": [r.latency * 1000.0 for r in done]}
    for name in percentile_metrics:
        summary.update(stats_of(name, series[name], percentiles))
    summary["errors"] = error_groups(results)
    return summary


def stats_of(name: str, values_ms: Sequence[float], percentiles: Sequence[float]) -> dict:
    """mean / median / std / percentiles of one metric; None when nothing was measured."""
    ms = np.asarray(values_ms, dtype=float)
    empty = ms.size == 0
    out = {f"mean_{name}_ms": None if empty else float(ms.mean()),
           f"median_{name}_ms": None if empty else float(np.median(ms)),
           f"std_{name}_ms": None if empty else float(ms.std())}
    for p in percentiles:
        out[f"{percentile_key(p)}_{name}_ms"] = None if empty else float(np.percentile(ms, p))
    return out
