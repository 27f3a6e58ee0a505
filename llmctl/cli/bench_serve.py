"""`llmctl bench serve` and `llmctl bench serve sweep`: the online client, with
`vllm bench serve`'s flag names. Options are declared once here and shared by both."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmctl.errors import LlmctlError

_T, _W, _L, _M, _O = "Target", "Workload", "Load", "Metrics", "Output"

BaseUrl = Annotated[Optional[list[str]], typer.Option(
    help="Server root; twice or more for an A/B run. \\[default: local 8000]", rich_help_panel=_T)]
Endpoint = Annotated[str, typer.Option(help="/v1/completions or /v1/chat/completions.", rich_help_panel=_T)]
Model = Annotated[Optional[str], typer.Option(help="Model name to send. \\[default: first listed]", rich_help_panel=_T)]
ApiKey = Annotated[Optional[str], typer.Option(envvar="LLMCTL_API_KEY", help="Bearer key.", rich_help_panel=_T)]
Tokenizer = Annotated[Optional[str], typer.Option(
    help="Local tokenizer dir. \\[default: server /tokenize]", rich_help_panel=_T)]
Dataset = Annotated[str, typer.Option(help="random, corpus (chat-like lengths) or a JSONL file.", rich_help_panel=_W)]
NumPrompts = Annotated[int, typer.Option(help="Requests to measure.", rich_help_panel=_W)]
InputLen = Annotated[int, typer.Option("--random-input-len", "--input-len", help="Prompt tokens (exact).",
                                       rich_help_panel=_W)]
OutputLen = Annotated[Optional[int], typer.Option("--random-output-len", "--output-len",
                                                  help="Output tokens, EOS ignored (128; corpus: drawn).",
                                                  rich_help_panel=_W)]
RangeRatio = Annotated[float, typer.Option("--random-range-ratio", help="Lengths uniform in mean x (1 +- r).",
                                           rich_help_panel=_W)]
PrefixLen = Annotated[int, typer.Option("--random-prefix-len", help="Shared prefix tokens before each prompt.",
                                        rich_help_panel=_W)]
Seed = Annotated[int, typer.Option(help="Seed of the workload, arrivals and hang-ups.", rich_help_panel=_W)]
Arrival = Annotated[str, typer.Option(help="poisson, gamma or constant.", rich_help_panel=_L)]
Burstiness = Annotated[float, typer.Option(help="Gamma shape: <1 bursty, >1 even.", rich_help_panel=_L)]
RampUp = Annotated[Optional[str], typer.Option("--ramp-up-strategy", help="linear or exponential.",
                                               rich_help_panel=_L)]
RampStart = Annotated[Optional[float], typer.Option(help="Ramp-up: first rate (req/s).", rich_help_panel=_L)]
RampEnd = Annotated[Optional[float], typer.Option(help="Ramp-up: last rate (req/s).", rich_help_panel=_L)]
NumWarmups = Annotated[int, typer.Option(help="Requests sent first, left out of stats.", rich_help_panel=_L)]
Duration = Annotated[Optional[float], typer.Option(help="Soak: repeat the workload for N seconds.",
                                                   rich_help_panel=_L)]
Disconnect = Annotated[float, typer.Option(help="Share of requests that hang up mid-stream.", rich_help_panel=_L)]
AbRounds = Annotated[int, typer.Option(help="A/B: rounds the targets alternate over.", rich_help_panel=_L)]
PctMetrics = Annotated[str, typer.Option(help="Metrics with percentiles.", rich_help_panel=_M)]
Percentiles = Annotated[str, typer.Option(help="Percentiles, e.g. 50,90,99.", rich_help_panel=_M)]
Goodput = Annotated[Optional[list[str]], typer.Option(help="SLO in ms, e.g. ttft:500 (repeat).", rich_help_panel=_M)]
OutputJson = Annotated[Optional[Path], typer.Option(help="Report with every request.", rich_help_panel=_O)]
OutputCsv = Annotated[Optional[Path], typer.Option(help="One row per request.", rich_help_panel=_O)]
Plot = Annotated[Optional[Path], typer.Option(help="Write PNG plots into DIR.", rich_help_panel=_O)]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON, not the table.", rich_help_panel=_O)]

app = typer.Typer(invoke_without_command=True, no_args_is_help=False, pretty_exceptions_enable=False)


def build_config(base_url: str, **kw):
    from llmctl.bench.metrics import parse_percentile_metrics, parse_percentiles, parse_slos
    from llmctl.bench.serve_client import ServeBenchConfig

    kw["percentile_metrics"] = parse_percentile_metrics(kw["percentile_metrics"])
    kw["metric_percentiles"] = parse_percentiles(kw["metric_percentiles"])
    kw["goodput"] = parse_slos(kw["goodput"] or [])
    return ServeBenchConfig(base_url=base_url, **kw)


def targets(base_url: list[str] | None) -> list[str]:
    from llmctl.bench.client import check_base_url

    urls = [check_base_url(u) for u in (base_url or ["http://127.0.0.1:8000"])]
    if len(set(urls)) != len(urls):
        raise LlmctlError("--base-url: the same target twice", hint="an A/B run compares different servers")
    return urls


@app.callback(help="Load an OpenAI-compatible server; report vLLM's serving metrics.")
def serve_bench(
    ctx: typer.Context,
    base_url: BaseUrl = None, endpoint: Endpoint = "/v1/completions", model: Model = None, api_key: ApiKey = None,
    tokenizer: Tokenizer = None, dataset: Dataset = "random", num_prompts: NumPrompts = 64, input_len: InputLen = 128,
    output_len: OutputLen = None, range_ratio: RangeRatio = 0.0, prefix_len: PrefixLen = 0, seed: Seed = 0,
    request_rate: Annotated[float, typer.Option(help="Requests/s (inf: all at once).", rich_help_panel=_L)] = math.inf,
    arrival: Arrival = "poisson", burstiness: Burstiness = 1.0, ramp_up: RampUp = None,
    ramp_up_start_rps: RampStart = None, ramp_up_end_rps: RampEnd = None,
    max_concurrency: Annotated[Optional[int], typer.Option(help="Most requests in flight.", rich_help_panel=_L)] = None,
    num_warmups: NumWarmups = 0, duration: Duration = None, disconnect_fraction: Disconnect = 0.0,
    ab_rounds: AbRounds = 4, percentile_metrics: PctMetrics = "ttft,tpot,itl,e2el",
    metric_percentiles: Percentiles = "99", goodput: Goodput = None, output_json: OutputJson = None,
    output_csv: OutputCsv = None, plot: Plot = None, as_json: AsJson = False,
) -> None:
    if ctx.invoked_subcommand is not None:
        return
    from llmctl.cli.bench_serve_run import run_single

    urls = targets(base_url)
    cfg = build_config(urls[0], endpoint=endpoint, model=model, api_key=api_key, tokenizer=tokenizer, dataset=dataset,
                       num_prompts=num_prompts, input_len=input_len, output_len=output_len, range_ratio=range_ratio,
                       prefix_len=prefix_len, seed=seed, request_rate=request_rate, arrival=arrival,
                       burstiness=burstiness, ramp_up=ramp_up, ramp_up_start_rps=ramp_up_start_rps,
                       ramp_up_end_rps=ramp_up_end_rps, max_concurrency=max_concurrency, num_warmups=num_warmups,
                       duration_s=duration, disconnect_fraction=disconnect_fraction,
                       percentile_metrics=percentile_metrics, metric_percentiles=metric_percentiles, goodput=goodput)
    if duration is not None and not max_concurrency and not math.isfinite(request_rate):
        raise LlmctlError("--duration: needs --max-concurrency or a finite --request-rate",
                          hint="e.g. --duration 600 --max-concurrency 32")
    if len(urls) > 1:
        from rich.console import Console

        from llmctl.cli.bench_serve_ab import run_ab_command

        run_ab_command(cfg, urls, ab_rounds, output_json, output_csv, plot, as_json, Console(stderr=True))
        return
    run_single(cfg, urls, ab_rounds, output_json, output_csv, plot, as_json)


_S = "Sweep"


SWEEP_EXAMPLES = (
    "llmctl bench serve sweep --request-rates 1,2,4,8",
    "llmctl bench serve sweep --concurrencies 1,4,16 --output-json sweep.json",
)


@app.command("sweep", help="Rates, concurrencies or an SLO search; one table and one JSON.",
             epilog="[bold]Examples[/bold]\n\n" + "\n\n".join(f"  {e}" for e in SWEEP_EXAMPLES))
def sweep(
    base_url: BaseUrl = None, endpoint: Endpoint = "/v1/completions", model: Model = None, api_key: ApiKey = None,
    tokenizer: Tokenizer = None, dataset: Dataset = "random", num_prompts: NumPrompts = 64, input_len: InputLen = 128,
    output_len: OutputLen = None, range_ratio: RangeRatio = 0.0, prefix_len: PrefixLen = 0, seed: Seed = 0,
    request_rates: Annotated[Optional[str], typer.Option(help="Rates to try, e.g. 1,2,4,8.", rich_help_panel=_S)] = None,
    concurrencies: Annotated[Optional[str], typer.Option(help="Concurrencies, e.g. 1,4,16.", rich_help_panel=_S)] = None,
    slo: Annotated[Optional[list[str]], typer.Option(help="p99 limit in ms, e.g. ttft:500 (repeat).",
                                                     rich_help_panel=_S)] = None,
    search_steps: Annotated[int, typer.Option(help="SLO search: bisection steps.", rich_help_panel=_S)] = 4,
    saturation_after: Annotated[float, typer.Option(help="No early stop before N s of a rate.",
                                                    rich_help_panel=_S)] = 5.0,
    arrival: Arrival = "poisson", burstiness: Burstiness = 1.0, num_warmups: NumWarmups = 0,
    ab_rounds: AbRounds = 4, percentile_metrics: PctMetrics = "ttft,tpot,itl,e2el",
    metric_percentiles: Percentiles = "50,99", goodput: Goodput = None, output_json: OutputJson = None,
    output_csv: OutputCsv = None, plot: Plot = None, as_json: AsJson = False,
) -> None:
    from llmctl.bench.metrics import parse_slos
    from llmctl.bench.sweep import SweepConfig
    from llmctl.cli.bench_serve_ab import run_sweep_command

    urls = targets(base_url)
    cfg = build_config(urls[0], endpoint=endpoint, model=model, api_key=api_key, tokenizer=tokenizer, dataset=dataset,
                       num_prompts=num_prompts, input_len=input_len, output_len=output_len, range_ratio=range_ratio,
                       prefix_len=prefix_len, seed=seed, arrival=arrival, burstiness=burstiness,
                       num_warmups=num_warmups, percentile_metrics=percentile_metrics,
                       metric_percentiles=metric_percentiles, goodput=goodput)
    spec = SweepConfig(request_rates=_numbers(request_rates, float, "--request-rates"),
                       concurrencies=_numbers(concurrencies, int, "--concurrencies"),
                       slo=parse_slos(slo or [], "--slo"), search_steps=search_steps,
                       saturation_after_s=saturation_after, ab_rounds=ab_rounds)
    run_sweep_command(cfg, spec, urls, output_json, output_csv, plot, as_json)


def _numbers(text: str | None, kind, flag: str) -> tuple:
    if not text:
        return ()
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise LlmctlError(f"{flag}: comma-separated numbers, got {text!r}") from None
