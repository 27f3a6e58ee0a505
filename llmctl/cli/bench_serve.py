"""`llmctl bench serve`: the online client, with `vllm bench serve`'s flag names."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmctl.errors import ConfigError


def _parse_goodput(items: list[str]) -> dict[str, float]:
    slo = {}
    for item in items:
        key, _, value = item.partition(":")
        if key not in ("ttft", "tpot", "e2el") or not value:
            raise ConfigError(f"--goodput: expected ttft:MS, tpot:MS or e2el:MS, got {item!r}")
        slo[key] = float(value)
    return slo


def serve_bench(
    base_url: Annotated[str, typer.Option(help="The server, e.g. http://127.0.0.1:8000.")] = "http://127.0.0.1:8000",
    endpoint: Annotated[str, typer.Option(help="/v1/completions or /v1/chat/completions.")] = "/v1/completions",
    model: Annotated[Optional[str], typer.Option(help="Model name to send (default: the first of /v1/models).")] = None,
    api_key: Annotated[Optional[str], typer.Option(envvar="LLMCTL_API_KEY", help="Bearer key, if the server wants one.")] = None,
    num_prompts: Annotated[int, typer.Option(help="Requests to send.")] = 64,
    input_len: Annotated[int, typer.Option("--random-input-len", "--input-len", help="Prompt tokens (about).")] = 128,
    output_len: Annotated[int, typer.Option("--random-output-len", "--output-len", help="Tokens to generate, EOS ignored.")] = 128,
    max_concurrency: Annotated[Optional[int], typer.Option(help="Most requests in flight at once (default: all).")] = None,
    request_rate: Annotated[float, typer.Option(help="Requests per second, Poisson arrivals (default inf: all at once).")] = float("inf"),
    duration: Annotated[Optional[float], typer.Option(help="Soak: keep --max-concurrency clients busy this many seconds.")] = None,
    disconnect_fraction: Annotated[float, typer.Option(help="Share of requests that hang up mid-stream.")] = 0.0,
    goodput: Annotated[Optional[list[str]], typer.Option(help="SLO for goodput, e.g. --goodput ttft:500 --goodput tpot:50 (ms).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of prompts and disconnects.")] = 0,
    output_json: Annotated[Optional[Path], typer.Option(help="Write the results here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of the table.")] = False,
) -> None:
    from rich.console import Console

    from llmctl.bench.serve_client import ServeBenchConfig, benchmark

    if not 0.0 <= disconnect_fraction <= 1.0:
        raise ConfigError(f"--disconnect-fraction: must be in [0, 1], got {disconnect_fraction}")
    if duration is not None and not max_concurrency:
        raise ConfigError("--duration: needs --max-concurrency (the number of clients to keep busy)")
    cfg = ServeBenchConfig(base_url=base_url.rstrip("/"), endpoint=endpoint, model=model, api_key=api_key,
                           num_prompts=num_prompts, input_len=input_len, output_len=output_len,
                           max_concurrency=max_concurrency, request_rate=request_rate, duration_s=duration,
                           disconnect_fraction=disconnect_fraction, seed=seed, goodput=_parse_goodput(goodput or []))
    with Console(stderr=True).status(f"loading {base_url}"):
        summary = benchmark(cfg)
    summary["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine()}
    if output_json:
        output_json.parent.mkdir(parents=True, exist_ok=True)
        output_json.write_text(json.dumps(summary, indent=2))
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        Console().print(render_table(summary))


def render_table(s: dict):
    from rich.table import Table

    table = Table(title="Serving Benchmark Result", show_header=False)
    rows = [("Successful requests", f"{s['completed']}"), ("Failed requests", f"{s['failed']}"),
            ("Disconnected (by design)", f"{s['disconnected']}"), ("5xx responses", f"{s['status_5xx']}"),
            ("Benchmark duration (s)", f"{s['duration_s']:.2f}"), ("Total input tokens", f"{s['total_input_tokens']}"),
            ("Total generated tokens", f"{s['total_output_tokens']}"),
            ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
            ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}")]
    if "request_goodput" in s:
        rows.append(("Request goodput (req/s)", f"{s['request_goodput']:.2f}"))
    for name, label in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        for stat in ("mean", "median", "p99"):
            rows.append((f"{stat.capitalize()} {name.upper()} (ms)", f"{s[f'{stat}_{name}_ms']:.2f}"))
    for key, value in rows:
        table.add_row(key, value)
    return table
