"""`llmctl bench`: throughput (offline), serve (online client) and kernels."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmctl.cli import bench_serve
from llmctl.cli.common import examples

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)


_W = "Workload"
_E = "Engine"
_SW = "Engine switches"
_OUT = "Output"
THROUGHPUT_EXAMPLES = (
    "llmctl bench throughput --num-prompts 64 --input-len 128 --output-len 128",
    "llmctl bench throughput --model smollm2-gptq --baseline default",
    "llmctl bench throughput --model recipes/llama3-8b.yaml --load-format dummy",
)
SERVE_EXAMPLES = (
    "llmctl bench serve --base-url http://127.0.0.1:8000 --num-prompts 64",
    "llmctl bench serve --max-concurrency 16 --dataset corpus --output-json s.json",
)
KERNELS_EXAMPLES = (
    "llmctl bench kernels",
    "llmctl bench kernels --batch-sizes 1,16,256 --group-size 64",
)


@app.command("throughput", help="Offline, in-process throughput (like `vllm bench throughput`). With a recipe as "
                                  "--model, its model, cache, scheduler and bench settings are the defaults.",
             epilog=examples(*THROUGHPUT_EXAMPLES))
def throughput(
    model: Annotated[str, typer.Option(help="'default', a model dir or a recipe YAML.")] = "default",
    baseline: Annotated[Optional[str], typer.Option(help="A second model, same prompts, same run.")] = None,
    backend: Annotated[str, typer.Option(help="llmctl, hf, hf-sequential, all, or a list.")] = "llmctl",
    num_prompts: Annotated[Optional[int], typer.Option(help="Requests. \\[default: 64]", rich_help_panel=_W)] = None,
    input_len: Annotated[Optional[int], typer.Option(help="Prompt tokens. \\[default: 128]", rich_help_panel=_W)] = None,
    output_len: Annotated[Optional[int], typer.Option(help="Output tokens, EOS ignored. \\[default: 128]", rich_help_panel=_W)] = None,
    n: Annotated[Optional[int], typer.Option(help="Samples per request. \\[default: 1]", rich_help_panel=_W)] = None,
    dataset: Annotated[Optional[str], typer.Option(help="random or corpus. \\[default: random]", rich_help_panel=_W)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of prompts and dummy weights. \\[default: 0]", rich_help_panel=_W)] = None,
    max_num_seqs: Annotated[Optional[int], typer.Option(help="Sequences per step. \\[default: 128]", rich_help_panel=_E)] = None,
    max_num_batched_tokens: Annotated[Optional[int], typer.Option(help="Tokens per step. \\[default: 2048]", rich_help_panel=_E)] = None,
    max_model_len: Annotated[Optional[int], typer.Option(help="Longest sequence. \\[default: the model's]", rich_help_panel=_E)] = None,
    hf_batch_size: Annotated[int, typer.Option(help="Prompts per hf generate call.", rich_help_panel=_E)] = 64,
    dtype: Annotated[Optional[str], typer.Option(help="auto, float32, float16, bfloat16. \\[default: auto]", rich_help_panel=_E)] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda. \\[default: auto]", rich_help_panel=_E)] = None,
    load_format: Annotated[str, typer.Option(help="auto, or dummy (random weights).", rich_help_panel=_E)] = "auto",
    quantization: Annotated[Optional[str], typer.Option(help="gptq: dummy weights in 4-bit.", rich_help_panel=_E)] = None,
    enforce_eager: Annotated[Optional[bool], typer.Option(help="No CUDA graphs. \\[default: off]", rich_help_panel=_SW)] = None,
    kv_cache_memory: Annotated[Optional[str], typer.Option(help="KV budget. \\[default: CPU: 1GiB]", rich_help_panel=_E)] = None,
    gpu_memory_utilization: Annotated[Optional[float], typer.Option(help="GPU memory share. \\[default: 0.9]", rich_help_panel=_E)] = None,
    enable_prefix_caching: Annotated[Optional[bool], typer.Option(help="Prefix caching. \\[default: on]", rich_help_panel=_SW)] = None,
    tensor_parallel_size: Annotated[Optional[int], typer.Option("--tensor-parallel-size", "-tp", help="GPUs the model spans. \\[default: 1]", rich_help_panel=_E)] = None,
    output_json: Annotated[Optional[Path], typer.Option(help="Write results, machine, commit.", rich_help_panel=_OUT)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON, not the table.", rich_help_panel=_OUT)] = False,
    show_config: Annotated[bool, typer.Option("--show-config", help="Print each setting and its source; exit.",
                                              rich_help_panel=_OUT)] = False,
) -> None:
    from llmctl.bench.throughput import BACKENDS
    from llmctl.cli.bench_throughput import run_throughput_command, throughput_settings
    from llmctl.errors import ConfigError

    backends = BACKENDS if backend == "all" else tuple(b.strip() for b in backend.split(","))
    if any(b not in BACKENDS for b in backends):
        raise ConfigError(f"--backend: must be one of {', '.join(BACKENDS)} or all, got {backend!r}")
    if quantization is not None and load_format != "dummy":
        raise ConfigError("--quantization: only with --load-format dummy",
                          hint="a GPTQ checkpoint's own config.json says how it is quantized")
    if quantization is not None and backends != ("llmctl",):
        raise ConfigError("--quantization: the hf baselines run dense models only", hint="use --backend llmctl")
    settings = throughput_settings(
        model, num_prompts=num_prompts, input_len=input_len, output_len=output_len, n=n, dataset=dataset,
        seed=seed, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len, dtype=dtype, device=device, kv_cache_memory=kv_cache_memory,
        gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching,
        quantization=quantization, enforce_eager=enforce_eager, tensor_parallel_size=tensor_parallel_size)
    if show_config:
        from llmctl.settings import BENCH_SECTIONS, print_settings

        print_settings(settings, BENCH_SECTIONS)
        return
    config, bench = settings.engine, settings.bench
    run_throughput_command(config, bench, backends, hf_batch_size, load_format, output_json, as_json, baseline)


app.add_typer(bench_serve.app, name="serve", epilog=examples(*SERVE_EXAMPLES), help="Load any OpenAI-compatible server with streaming requests; report "
                                                  "`vllm bench serve` metrics (TTFT, TPOT, ITL, E2EL, goodput). "
                                                  "`sweep`: rates, concurrencies or an SLO search.")


@app.command("kernels", help="W4A16 kernels against cuBLAS fp16 on Llama-3-8B layer shapes (GPU).",
             epilog=examples(*KERNELS_EXAMPLES))
def kernels(
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated M values.", show_default="1,2,4,...,1024,4096")] = "1,2,4,8,16,32,64,128,256,1024,4096",
    group_size: Annotated[int, typer.Option(help="GPTQ group size: -1, 32, 64 or 128.")] = 128,
    act_order: Annotated[bool, typer.Option(help="Also time act-order (permuted K) weights.")] = True,
    reps: Annotated[int, typer.Option(help="CUDA-graph replays per timing (the median is kept).")] = 20,
    eager: Annotated[bool, typer.Option(help="Also time eager launches (host overhead included).")] = True,
    tune: Annotated[bool, typer.Option(help="First sweep every kernel configuration and write this GPU's table "
                                            "to llmctl_kernels/w4a16/tables.json.")] = False,
    output_json: Annotated[Optional[Path], typer.Option(help="Write all rows and the summary here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of the table.")] = False,
) -> None:
    import json
    import sys

    from rich.console import Console

    from llmctl.bench.kernels import KernelBenchConfig, render_table, run_kernel_bench
    from llmctl.errors import ConfigError

    try:
        ms = tuple(int(v) for v in batch_sizes.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--batch-sizes must be comma-separated integers, got {batch_sizes!r}") from None
    cfg = KernelBenchConfig(batch_sizes=ms, group_size=group_size, act_order=act_order, reps=reps, eager=eager)
    err = Console(stderr=True)
    records = None
    if tune:
        import torch

        from llmctl_kernels.w4a16.tune import build_table, sweep, write_table

        if not torch.cuda.is_available():
            from llmctl.bench.kernels import DeviceUnavailableError

            raise DeviceUnavailableError("--tune needs a CUDA device", hint="run it on a machine with an NVIDIA GPU")
        records = sweep([(n, k) for _, k, n in cfg.shapes], list(ms), group_size, log=err.print)
        write_table(build_table(records), torch.device("cuda"))
        err.print("wrote llmctl_kernels/w4a16/tables.json")
    result = run_kernel_bench(cfg, log=err.print)
    if records is not None:
        result["tune_records"] = records
    if output_json is not None:
        output_json.parent.mkdir(parents=True, exist_ok=True)
        output_json.write_text(json.dumps(result, indent=1) + "\n")
    if as_json:
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
    else:
        Console().print(render_table(result))
