"""Output of `llmctl bench serve`: strict JSON (an infinite rate is the string "inf", never
`Infinity`), one CSV row per request, and the rich summary table under vLLM's labels."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from llmctl.bench.metrics import METRICS

_LABELS = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
           "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
CSV_FIELDS = ("index", "target", "warmup", "scheduled_time", "send_time", "end_time", "success", "disconnected", "cancelled", "status",
              "error", "expected_prompt_len", "prompt_len", "requested_output_len", "output_len", "ttft", "tpot",
              "latency", "num_itl", "mean_itl")


def json_safe(obj: Any) -> Any:
    """inf -> "inf", NaN -> null, tuples -> lists: what `json.dumps(allow_nan=False)` takes."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def to_json(obj: Any) -> str:
    return json.dumps(json_safe(obj), indent=2, allow_nan=False)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(obj) + "\n")


def write_requests_csv(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for rec in records:
            itl = rec.get("itl") or []
            writer.writerow({**rec, "num_itl": len(itl), "mean_itl": sum(itl) / len(itl) if itl else ""})


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_rows(s: dict) -> list[tuple[str, str]]:
    """(label, value) rows of one run, in `vllm bench serve`'s order and wording."""
    rows = [("Successful requests", _fmt(s["completed"])), ("Failed requests", _fmt(s["failed"]))]
    for key, label in (("disconnected", "Disconnected (by design)"), ("cancelled", "Cancelled (run stopped)"),
                       ("warmups", "Warm-up requests (excluded)"), ("status_5xx", "5xx responses")):
        if s.get(key):
            rows.append((label, _fmt(s[key])))
    rows += [("Maximum request concurrency", _fmt(s.get("max_concurrency"))),
             ("Benchmark duration (s)", _fmt(s["duration"])), ("Total input tokens", _fmt(s["total_input_tokens"])),
             ("Total generated tokens", _fmt(s["total_output_tokens"])),
             ("Request throughput (req/s)", _fmt(s["request_throughput"]))]
    if "request_goodput" in s:
        rows.append(("Request goodput (req/s)", _fmt(s["request_goodput"])))
    rows += [("Output token throughput (tok/s)", _fmt(s["output_throughput"])),
             ("Total token throughput (tok/s)", _fmt(s["total_token_throughput"]))]
    for name in METRICS:
        if f"mean_{name}_ms" not in s:
            continue
        rows.append((f"[bold]{_LABELS[name]}[/]", ""))
        for stat in ("mean", "median"):
            rows.append((f"{stat.capitalize()} {name.upper()} (ms)", _fmt(s[f"{stat}_{name}_ms"])))
        for key in sorted(k for k in s if k.endswith(f"_{name}_ms") and k.startswith("p")):
            rows.append((f"{key.split('_')[0].upper()} {name.upper()} (ms)", _fmt(s[key])))
    return rows + _server_rows(s.get("server_metrics"))


def _server_rows(m: dict | None) -> list[tuple[str, str]]:
    if not m:
        return []
    pct = (lambda v: "-" if v is None else f"{100 * v:.1f}%")
    return [("[bold]Server (/metrics)[/]", ""), ("KV-cache usage, peak", pct(m["kv_cache_usage_max"])),
            ("Preemptions", _fmt(m["num_preemptions"], 0)), ("Prefix-cache hit rate", pct(m["prefix_cache_hit_rate"])),
            ("Mean queue time (ms)", _fmt(m["mean_queue_time_ms"])),
            ("Waiting requests, peak", _fmt(m["num_requests_waiting_max"], 0))]


def render_summary(s: dict):
    from rich.table import Table

    title = f"Serving Benchmark Result: {s.get('model_id', '')} at {s.get('base_url', '')}"
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary_rows(s):
        table.add_row(key, value)
    return table


def error_lines(s: dict, limit: int = 5) -> list[str]:
    """Failed requests by status with the server's message, most frequent first."""
    lines = [f"{e['count']} x {'HTTP ' + str(e['status']) if e['status'] else 'no response'}: {e['message']}"
             for e in s.get("errors", [])[:limit]]
    more = len(s.get("errors", [])) - limit
    return lines + ([f"... and {more} more kinds"] if more > 0 else [])
