"""`llmctl serve`: the OpenAI-compatible server, with vLLM's flag names."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

_ENGINE = "Engine"
_SWITCH = "Engine switches"
_SERVER = "Server"
_TEST = "Testing"
EXAMPLES = (
    "llmctl serve",
    "llmctl serve smollm2-gptq --port 8001 --api-key \"$KEY\"",
    "llmctl serve recipes/llama3-8b.yaml --max-num-seqs 64",
)


def serve(
    model: Annotated[Optional[str], typer.Argument(help="Model dir, GPTQ checkpoint, recipe or `default`.")] = None,
    recipe: Annotated[Optional[str], typer.Option("--recipe", help="Recipe YAML (model, cache, scheduler, serve).")] = None,
    host: Annotated[Optional[str], typer.Option(help="Address to bind. \\[default: 127.0.0.1]", rich_help_panel=_SERVER)] = None,
    port: Annotated[Optional[int], typer.Option(help="Port, checked before loading. \\[default: 8000]", rich_help_panel=_SERVER)] = None,
    served_model_name: Annotated[Optional[str], typer.Option(help="The model name clients send.", rich_help_panel=_SERVER)] = None,
    api_key: Annotated[Optional[str], typer.Option(help="Require this bearer key on /v1 (or LLMCTL_API_KEY).", rich_help_panel=_SERVER)] = None,
    max_request_bytes: Annotated[Optional[int], typer.Option(help="Largest body; 413 past it. \\[default: 4194304]", rich_help_panel=_SERVER)] = None,
    shutdown_grace_s: Annotated[Optional[float], typer.Option(help="Seconds to finish on SIGTERM. \\[default: 10]", rich_help_panel=_SERVER)] = None,
    chat_template: Annotated[Optional[str], typer.Option(help="Jinja chat template file to use instead.", rich_help_panel=_SERVER)] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto, float32, float16, bfloat16. \\[default: auto]", rich_help_panel=_ENGINE)] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N. \\[default: auto]", rich_help_panel=_ENGINE)] = None,
    max_model_len: Annotated[Optional[int], typer.Option(help="Context length. \\[default: the model's]", rich_help_panel=_ENGINE)] = None,
    max_num_seqs: Annotated[Optional[int], typer.Option(help="Sequences per step. \\[default: 128]", rich_help_panel=_ENGINE)] = None,
    max_num_batched_tokens: Annotated[Optional[int], typer.Option(help="Tokens per step. \\[default: 2048]", rich_help_panel=_ENGINE)] = None,
    block_size: Annotated[Optional[int], typer.Option(help="Tokens per KV block. \\[default: 16]", rich_help_panel=_ENGINE)] = None,
    gpu_memory_utilization: Annotated[Optional[float], typer.Option(help="GPU memory share. \\[default: 0.9]", rich_help_panel=_ENGINE)] = None,
    kv_cache_memory: Annotated[Optional[str], typer.Option(help="KV budget, e.g. 2GiB. \\[default: CPU: 1GiB]", rich_help_panel=_ENGINE)] = None,
    enable_prefix_caching: Annotated[Optional[bool], typer.Option("--enable-prefix-caching/--no-enable-prefix-caching", help="Share prompt prefixes' KV.", rich_help_panel=_SWITCH)] = None,
    enforce_eager: Annotated[Optional[bool], typer.Option("--enforce-eager/--no-enforce-eager", help="No CUDA graphs (decode, prefill).", rich_help_panel=_SWITCH)] = None,
    max_prefill_graph_tokens: Annotated[Optional[int], typer.Option(help="Largest prefill step a CUDA graph replays; 0: none. \\[default: 2048]", rich_help_panel=_ENGINE)] = None,
    tensor_parallel_size: Annotated[Optional[int], typer.Option("--tensor-parallel-size", "-tp", help="GPUs the model spans. \\[default: 1]", rich_help_panel=_ENGINE)] = None,
    load_format: Annotated[str, typer.Option(help="auto, or dummy (random weights).", rich_help_panel=_TEST)] = "auto",
    quantization: Annotated[Optional[str], typer.Option(help="gptq: dummy weights in 4-bit.", rich_help_panel=_TEST)] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.", rich_help_panel=_SERVER)] = "info",
    show_config: Annotated[bool, typer.Option("--show-config", help="Print each setting and its source; exit.")] = False,
) -> None:
    from llmctl.engine.loading import check_load_format
    from llmctl.errors import ConfigError
    from llmctl.settings import SERVE_SECTIONS, print_settings, resolve

    if quantization is not None and check_load_format(load_format) != "dummy":
        raise ConfigError("--quantization: only with --load-format dummy",
                          hint="a GPTQ checkpoint's own config.json says how it is quantized")
    settings = resolve(model, {
        "serve.host": host, "serve.port": port, "serve.served_model_name": served_model_name,
        "serve.api_key": resolve_api_key(api_key), "serve.max_request_bytes": max_request_bytes,
        "serve.shutdown_grace_s": shutdown_grace_s, "serve.chat_template": chat_template, "model.dtype": dtype, "model.device": device,
        "model.max_model_len": max_model_len, "model.enforce_eager": enforce_eager,
        "model.max_prefill_graph_tokens": max_prefill_graph_tokens,
        "scheduler.max_num_seqs": max_num_seqs, "scheduler.max_num_batched_tokens": max_num_batched_tokens,
        "cache.block_size": block_size, "cache.gpu_memory_utilization": gpu_memory_utilization,
        "cache.kv_cache_memory": kv_cache_memory, "cache.enable_prefix_caching": enable_prefix_caching,
        "model.quantization": quantization, "parallel.tensor_parallel_size": tensor_parallel_size,
    }, recipe=recipe)
    if show_config:
        print_settings(settings, SERVE_SECTIONS)
        return
    _run(settings.engine, settings.serve, model, log_level, load_format)


def resolve_api_key(flag: str | None) -> str | None:
    """--api-key, else LLMCTL_API_KEY. An empty one is refused: `--api-key "$KEY"` with KEY
    unset would otherwise start a server that anyone can use."""
    from llmctl.errors import ConfigError

    if flag is not None:
        if not flag.strip():
            raise ConfigError("--api-key: the key is empty", hint="is the variable you passed set? "
                              "Leave --api-key out to serve without authentication")
        return flag
    env = os.environ.get("LLMCTL_API_KEY")
    if env is not None and not env.strip():
        raise ConfigError("LLMCTL_API_KEY is set but empty",
                          hint="set it to the key, or unset it to serve without authentication")
    return env


def _run(engine_config, serve_config, model_arg: str | None, log_level: str, load_format: str = "auto") -> None:
    from rich.console import Console

    if int(os.environ.get("RANK", "0")) > 0 and engine_config.parallel.tensor_parallel_size > 1:
        from llmctl.engine.llm_engine import LLMEngine

        LLMEngine(engine_config, load_format=load_format)  # a worker rank started by torchrun: runs rank 0's steps, never returns
        return

    from llmctl.serve.listen import bind_socket

    console = Console(stderr=True, highlight=False)
    # A taken port fails here, in a second, not after the model has loaded.
    sock = bind_socket(serve_config.host, serve_config.port)
    try:
        _load_and_serve(console, sock, engine_config, serve_config, model_arg, log_level, load_format)
    finally:
        sock.close()


def _load_and_serve(console, sock, engine_config, serve_config, model_arg, log_level, load_format) -> None:
    from llmctl.engine.llm_engine import LLMEngine
    from llmctl.serve.api_server import run_server
    from llmctl.serve.launcher import build_app, model_dir_of
    from llmctl.serve.startup import quant_check

    def progress(event: str, info: dict) -> None:
        console.print(info.get("message", event), markup=False)

    with console.status("loading the model"):
        engine = LLMEngine(engine_config, load_format=load_format, progress=progress)
    if engine.tokenizer is None:
        from llmctl.models.dummy import stand_in_tokenizer

        # Random weights of a recipe's shapes come without tokenizer files; text requests
        # still need one, and a benchmark only needs token counts that hold.
        engine.tokenizer = stand_in_tokenizer(engine.arch.vocab_size)
        console.print("no tokenizer with these weights: the default model's, placeholder tokens up to "
                      f"the vocabulary of {engine.arch.vocab_size:,}", markup=False)
    check = quant_check(model_dir_of(engine))
    for line in check.lines:
        # a failed gate is the user's call to make (yellow); a missing or unreadable check is red
        style = ("yellow" if line.startswith("WARNING: accuracy check FAILED") else
                 "bold red" if line.startswith("WARNING") else ("green" if "PASSED" in line else ""))
        console.print(line, style=style or None, markup=False)
    app = build_app(engine, serve_config, model_arg=model_arg)
    names = ", ".join(app.state.ctx.served_model_names)
    port = sock.getsockname()[1]
    console.print(f"serving {names} on http://{serve_config.host}:{port}/v1"
                  f"{' (API key required)' if serve_config.api_key else ''}", markup=False)
    if serve_config.host not in ("127.0.0.1", "localhost", "::1") and not serve_config.api_key:
        console.print(f"WARNING: bound to {serve_config.host} with no --api-key: anyone who reaches this port can use it",
                      style="bold red", markup=False)
    try:
        run_server(app, serve_config, log_level=log_level, sock=sock)
    finally:
        engine.shutdown()  # the other tensor-parallel ranks stop with this one
