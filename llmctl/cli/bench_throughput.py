"""Drawing for `llmctl bench throughput`: progress on stderr, the results table on stdout."""

from __future__ import annotations

import json
from pathlib import Path

from llmctl.cli.common import progress_bar


def throughput_settings(model: str, **options):
    """The settings of `llmctl bench throughput`: `model` is a model or a recipe; every
    option given (not None) is a flag. `seed` seeds both the prompts and dummy weights."""
    from llmctl.settings import resolve

    sections = {"num_prompts": "bench", "input_len": "bench", "output_len": "bench", "n": "bench",
                "dataset": "bench", "max_num_seqs": "scheduler", "max_num_batched_tokens": "scheduler",
                "max_model_len": "model", "dtype": "model", "device": "model", "quantization": "model",
                "enforce_eager": "model", "kv_cache_memory": "cache", "gpu_memory_utilization": "cache",
                "enable_prefix_caching": "cache", "tensor_parallel_size": "parallel"}
    flags = {f"{sections[k]}.{k}": v for k, v in options.items() if k != "seed"}
    flags.update({"model.seed": options.get("seed"), "bench.seed": options.get("seed")})
    return resolve(model, flags)


def run_throughput_command(config, bench, backends: tuple[str, ...], hf_batch_size: int, load_format: str,
                           output_json: Path | None, as_json: bool, baseline: str | None = None) -> None:
    from rich.console import Console

    from llmctl.bench.throughput import run_throughput
    from llmctl.cli.plan import print_plan

    err = Console(stderr=True)
    tasks: dict[str, int] = {}
    with progress_bar(err) as progress:

        def on_event(backend: str, event: str, info: dict) -> None:
            if event == "start":
                tasks[backend] = progress.add_task(f"{backend} requests", total=info["total"])
            elif event == "advance":
                progress.advance(tasks[backend], info["n"])
            elif event == "kv_plan":
                print_plan(info["plan"], title="KV plan (engine start)", console=err)
            elif event == "log":
                err.print(f"[dim]{info['message']}[/]")

        report = run_throughput(config, bench, backends, hf_batch_size, load_format, on_event, baseline=baseline)
    if output_json is not None:
        output_json.parent.mkdir(parents=True, exist_ok=True)
        output_json.write_text(json.dumps(report, indent=2))
        err.print(f"wrote {output_json}")
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from llmctl.bench.throughput import summary_rows

    cfg, env = report["config"], report["environment"]
    where = env.get("gpu") or env.get("processor")
    model = report["model"] + (f" ({report['quantization']})" if report.get("quantization") else "")
    table = Table(title=f"Throughput: {model}, {cfg['num_prompts']} requests x {cfg['input_len']} in / "
                        f"{cfg['output_len']} out (n={cfg['n']}, {cfg['dataset']}) on {where}, commit {env.get('commit')}",
                  title_justify="left")
    rows = summary_rows(report)
    extra = [k for k in ("x_baseline", "x_hf", "x_hf-sequential") if any(k in r for r in rows)]
    for col in ["backend", "req/s", "out tok/s", "total tok/s", "time s", *(f"x {k[2:]}" for k in extra)]:
        table.add_column(col, justify="left" if col == "backend" else "right")
    for r in rows:
        name = f"baseline: {report['baseline']}" if r["backend"] == "baseline" else r["backend"]
        table.add_row(name, f"{r['requests_per_s']:.2f}", f"{r['output_tok_s']:.1f}", f"{r['total_tok_s']:.1f}",
                      f"{r['elapsed_s']:.1f}", *(f"{r[k]:.2f}x" if k in r else "" for k in extra))
    Console().print(table)
