"""`llmctl bench`: throughput (offline), serve (online client) and kernels."""

from __future__ import annotations

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
def kernels() -> None:
    not_implemented("bench kernels")
