"""`llmctl plan`: the KV-cache budget and tensor-parallel verdict, before any weight is loaded."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Optional

import typer


def _default_model_arch():
    """The embedded model's architecture: its config.json once converted, else the GGUF
    header (read without touching the tensors)."""
    from llmctl.models.arch import arch_from_config, load_arch
    from llmctl.models.default import default_model_dir, is_default_model_converted

    if is_default_model_converted():
        return load_arch(default_model_dir())
    from gguf import GGUFReader

    from llmctl.paths import default_model_gguf

    fields = GGUFReader(default_model_gguf()).fields

    def value(key: str):
        f = fields[key]
        return f.parts[f.data[0]][0].item()

    heads = value("llama.attention.head_count")
    return arch_from_config({
        "architectures": ["LlamaForCausalLM"], "vocab_size": value("llama.vocab_size"),
        "hidden_size": value("llama.embedding_length"), "intermediate_size": value("llama.feed_forward_length"),
        "num_hidden_layers": value("llama.block_count"), "num_attention_heads": heads,
        "num_key_value_heads": value("llama.attention.head_count_kv"),
        "max_position_embeddings": value("llama.context_length"), "rope_theta": value("llama.rope.freq_base"),
        "rms_norm_eps": value("llama.attention.layer_norm_rms_epsilon"), "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }, source=str(default_model_gguf()))


def resolve_plan_target(settings):
    """(display name, ModelArch) of the resolved model: its inline `model.arch` (a recipe's),
    the embedded default, or a local dir's config.json."""
    from llmctl.models.arch import arch_from_config, load_arch

    recipe, model = settings.recipe, settings.model
    if model.arch is not None:
        where = recipe.path if recipe is not None and recipe.path else "model"
        name = recipe.name if recipe is not None else Path(model.model).name
        return name, arch_from_config(model.arch, source=f"{where}: model.arch")
    if model.model == "default":
        from llmctl.models.default import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME, _default_model_arch()
    return Path(model.model).name, load_arch(Path(model.model))


EXAMPLES = (
    "llmctl plan recipes/llama3-8b.yaml --gpu-memory 80GiB",
    "llmctl plan recipes/llama3-8b.yaml --gpu-memory 24GB -tp 2",
    "llmctl plan default --device cpu --kv-cache-memory 512MiB",
)


def plan(
    model_or_recipe: Annotated[str, typer.Argument(metavar="MODEL_OR_RECIPE",
                                                   help="'default', a local HF model dir, or a recipe YAML.")] = "default",
    gpu_memory: Annotated[str, typer.Option(help="Memory of one GPU, e.g. 80GiB (H100) or 141GB (H200).")] = "80GiB",
    gpu_memory_utilization: Annotated[Optional[float], typer.Option(help="Share of GPU memory llmctl may use.")] = None,
    tensor_parallel_size: Annotated[Optional[int], typer.Option("--tensor-parallel-size", "-tp")] = None,
    max_model_len: Annotated[Optional[int], typer.Option(help="Longest sequence (prompt + output).")] = None,
    block_size: Annotated[Optional[int], typer.Option(help="Tokens per KV block.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto | float16 | bfloat16 | float32")] = None,
    device: Annotated[str, typer.Option(help="gpu, or cpu (budget = --kv-cache-memory).")] = "gpu",
    kv_cache_memory: Annotated[Optional[str], typer.Option(help="Fixed KV budget, e.g. 1GiB (the CPU default).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    show_config: Annotated[bool, typer.Option("--show-config", help="Print every setting and where it came from (flag, recipe, default), then exit.")] = False,
) -> None:
    from llmctl.engine.kv_budget import plan_kv
    from llmctl.errors import ConfigError
    from llmctl.settings import PLAN_SECTIONS, print_settings, resolve
    from llmctl.units import parse_size

    if device not in ("gpu", "cpu"):
        raise ConfigError(f"--device: must be gpu or cpu, got {device!r}")
    settings = resolve(model_or_recipe, {
        "model.dtype": dtype, "model.max_model_len": max_model_len, "cache.block_size": block_size,
        "cache.gpu_memory_utilization": gpu_memory_utilization, "cache.kv_cache_memory": kv_cache_memory,
        "parallel.tensor_parallel_size": tensor_parallel_size})
    if show_config:
        print_settings(settings, PLAN_SECTIONS, echo=typer.echo)
        return
    name, arch = resolve_plan_target(settings)
    config = settings.engine

    def plan_of(target):
        return plan_kv(target, name, config.model, config.cache, config.scheduler, config.parallel, device=device,
                       gpu_memory=parse_size(gpu_memory, "--gpu-memory"))

    result = plan_of(arch)
    # A recipe's quantize section says what will be deployed: plan it beside the dense model.
    quantized = None
    if settings.recipe is not None and not arch.is_gptq:
        quantized = plan_of(dataclasses.replace(arch, quantization=settings.quant.gptq))
    if as_json:
        out = result.to_dict()
        if quantized is not None:
            out["quantized"] = quantized.to_dict()
        typer.echo(json.dumps(out, indent=2))
    elif quantized is not None:
        print_plans(result, quantized)
    else:
        print_plan(result)
    (quantized or result).check_fits()


def print_plans(dense, quantized, console=None) -> None:
    """Two plans of one model side by side: as it is, and as the recipe quantizes it."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"KV plan: {dense.model}", title_justify="left")
    table.add_column("")
    table.add_column(dense.weight_format, justify="right")
    table.add_column(quantized.weight_format, justify="right")
    for (label, a), (_, b) in zip(dense.rows(), quantized.rows()):
        if label.startswith("weights loaded"):
            label = "weights loaded"
        if label == "model" or (label.startswith("weights ") and label != "weights loaded"):
            continue  # the title and the columns say it
        table.add_row(label, a, b)
    (console or Console()).print(table)


def print_plan(result, title: str | None = None, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title or f"KV plan: {result.model}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for label, value in result.rows():
        style = None
        if label == "tensor parallelism":
            style = {"needed": "red", "wasteful": "yellow"}.get(result.tp_verdict, "green")
        if label == "KV blocks" and result.num_blocks < result.blocks_per_seq:
            style = "red"
        table.add_row(label, value, style=style)
    (console or Console()).print(table)
