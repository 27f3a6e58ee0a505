"""`llmctl bench`: throughput (offline), serve (online client) and kernels."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmctl.cli.common import not_implemented

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)


@app.command("throughput", help="Offline, in-process throughput (like `vllm bench throughput`).")
def throughput() -> None:
    not_implemented("bench throughput")


@app.command("serve", help="Load an OpenAI-compatible server and report `vllm bench serve` metrics.")
def serve_bench() -> None:
    not_implemented("bench serve")


@app.command("kernels", help="W4A16 kernels against cuBLAS fp16 on Llama-3-8B layer shapes (GPU).")
def kernels(
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated M values.")] = "1,2,4,8,16,32,64,128,256,1024,4096",
    group_size: Annotated[int, typer.Option(help="GPTQ group size: -1, 32, 64 or 128.")] = 128,
    act_order: Annotated[bool, typer.Option(help="Also time act-order (permuted K) weights.")] = True,
    reps: Annotated[int, typer.Option(help="CUDA-graph replays per timing (the median is kept).")] = 20,
    eager: Annotated[bool, typer.Option(help="Also time eager launches (host overhead included).")] = True,
    tune: Annotated[bool, typer.Option(help="First sweep every kernel configuration and write this GPU's table "
                                            "to kernels/configs/w4a16.json.")] = False,
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

        from kernels.w4a16_tune import build_table, sweep, write_table

        if not torch.cuda.is_available():
            from llmctl.bench.kernels import DeviceUnavailableError

            raise DeviceUnavailableError("--tune needs a CUDA device", hint="run it on a machine with an NVIDIA GPU")
        records = sweep([(n, k) for _, k, n in cfg.shapes], list(ms), group_size, log=err.print)
        write_table(build_table(records), torch.device("cuda"))
        err.print("wrote kernels/configs/w4a16.json")
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
