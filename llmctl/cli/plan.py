"""`llmctl plan`: the KV-cache budget and tensor-parallel verdict, before any weight is loaded."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmctl.config import CacheConfig, ModelConfig, ParallelConfig, SchedulerConfig


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


def resolve_plan_target(model_or_recipe: str):
    """(display name, ModelArch, Recipe | None) for a model name/dir or a recipe file."""
    from llmctl.models.arch import load_arch

    recipe = None
    model = model_or_recipe
    if model_or_recipe.endswith((".yaml", ".yml")):
        from llmctl.recipe import load_recipe

        recipe = load_recipe(model_or_recipe)
        if recipe.arch is not None:
            return recipe.name, recipe.arch, recipe
        model = recipe.model.model
    if model == "default":
        from llmctl.models.default import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME, _default_model_arch(), recipe
    return Path(model).name, load_arch(Path(model)), recipe


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
) -> None:
    from llmctl.engine.kv_budget import plan_kv
    from llmctl.errors import ConfigError
    from llmctl.recipe import parse_size

    if device not in ("gpu", "cpu"):
        raise ConfigError(f"--device: must be gpu or cpu, got {device!r}")
    name, arch, recipe = resolve_plan_target(model_or_recipe)
    model_cfg, cache_cfg = (recipe.model, recipe.cache) if recipe else (ModelConfig(), CacheConfig())
    sched_cfg, par_cfg = (recipe.scheduler, recipe.parallel) if recipe else (SchedulerConfig(), ParallelConfig())
    model_cfg = dataclasses.replace(model_cfg, **_given(dtype=dtype, max_model_len=max_model_len))
    cache_cfg = dataclasses.replace(cache_cfg, **_given(
        block_size=block_size, gpu_memory_utilization=gpu_memory_utilization,
        kv_cache_memory=parse_size(kv_cache_memory, "--kv-cache-memory") if kv_cache_memory else None))
    par_cfg = dataclasses.replace(par_cfg, **_given(tensor_parallel_size=tensor_parallel_size))
    result = plan_kv(arch, name, model_cfg, cache_cfg, sched_cfg, par_cfg, device=device,
                     gpu_memory=parse_size(gpu_memory, "--gpu-memory"))
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        print_plan(result)
    result.check_fits()


def _given(**kwargs):
    return {k: v for k, v in kwargs.items() if v is not None}


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
