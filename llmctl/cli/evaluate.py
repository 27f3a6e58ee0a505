"""`llmctl eval`: score models on llmctl's engine (or a server), compare them with a baseline,
gate on thresholds. Exit 0 pass, 1 error, 3 a failed gate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

_DATA = "Data"
_GATE = "Gate"
_ENGINE = "Engine"
_OUT = "Output"

EXAMPLES = (
    "llmctl eval -b default ./smollm2-gptq",
    "llmctl eval -b default q4-g64 q3-g64 q8-g64 --plot plots/",
    "llmctl eval default --base-url http://127.0.0.1:8000 --tasks ppl,mmlu",
)
HELP = ("Score models on llmctl's engine: perplexity, KLD against a baseline, cloze, MMLU, local "
        "tasks; gate on thresholds. Exit codes: 0 pass, 1 error, 3 a candidate failed its gate.")


def evaluate(
    models: Annotated[Optional[List[str]], typer.Argument(help="Models: `default`, dirs (dense or GPTQ), recipes; with --base-url, served names.", show_default=False)] = None,
    baseline: Annotated[Optional[str], typer.Option("--baseline", "-b", help="Reference for KLD, ppl increase and recovery.")] = None,
    tasks: Annotated[Optional[str], typer.Option(help="ppl, kld, cloze, mmlu, FILE.jsonl, FILE.yaml (comma-separated). \\[default: ppl,kld,cloze; ppl,cloze alone]")] = None,
    recipe: Annotated[Optional[str], typer.Option(help="Recipe YAML: its eval section gives defaults and gate.")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Local .txt, .jsonl, .parquet or datasets dir. \\[default: held-out split]", rich_help_panel=_DATA)] = None,
    window_len: Annotated[Optional[int], typer.Option(help="Tokens per window. \\[default: 1024]", rich_help_panel=_DATA)] = None,
    stride: Annotated[Optional[int], typer.Option(help="Tokens between window starts. \\[default: window length]", rich_help_panel=_DATA)] = None,
    num_windows: Annotated[Optional[int], typer.Option(help="Windows scored for ppl and KLD. \\[default: 16]", rich_help_panel=_DATA)] = None,
    limit: Annotated[Optional[int], typer.Option(help="Documents per task (per subject for MMLU).", rich_help_panel=_DATA)] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(help="Few-shot examples (MMLU: up to 5). \\[default: 0]", rich_help_panel=_DATA)] = None,
    kld_top_k: Annotated[Optional[int], typer.Option(help="Baseline log-probs kept per token (the rest: one bucket); 0: whole rows (16-bit codes), KLD within 2.5e-4. \\[default: 256]", rich_help_panel=_DATA)] = None,
    max_ppl_increase: Annotated[Optional[float], typer.Option(help="Relative ppl increase allowed. \\[default: 0.05]", rich_help_panel=_GATE)] = None,
    max_kld: Annotated[Optional[float], typer.Option(help="Mean KLD allowed, nats per token.", rich_help_panel=_GATE)] = None,
    min_top1: Annotated[Optional[float], typer.Option(help="Least share of tokens with the same top-1. \\[default: 0.9]", rich_help_panel=_GATE)] = None,
    min_recovery: Annotated[Optional[float], typer.Option(help="Least accuracy recovery per accuracy task.", rich_help_panel=_GATE)] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N. \\[default: auto]", rich_help_panel=_ENGINE)] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto, float32, float16 or bfloat16. \\[default: auto]", rich_help_panel=_ENGINE)] = None,
    max_model_len: Annotated[Optional[int], typer.Option(help="Engine context length. \\[default: the model's]", rich_help_panel=_ENGINE)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Sequences scored at once (max_num_seqs).", rich_help_panel=_ENGINE)] = None,
    max_num_batched_tokens: Annotated[Optional[int], typer.Option(help="Tokens per engine step.", rich_help_panel=_ENGINE)] = None,
    kv_cache_memory: Annotated[Optional[str], typer.Option(help="KV cache budget, e.g. 2GiB.", rich_help_panel=_ENGINE)] = None,
    tensor_parallel_size: Annotated[Optional[int], typer.Option("--tensor-parallel-size", "-tp", help="GPUs the model spans. \\[default: 1]", rich_help_panel=_ENGINE)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the engine. \\[default: 0]", rich_help_panel=_ENGINE)] = None,
    base_url: Annotated[Optional[str], typer.Option(help="Evaluate an OpenAI-compatible server instead.", rich_help_panel=_ENGINE)] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="With --base-url: the server's tokenizer dir. \\[default: default]", rich_help_panel=_ENGINE)] = None,
    api_key: Annotated[Optional[str], typer.Option(envvar="LLMCTL_API_KEY", help="With --base-url: bearer token.", rich_help_panel=_ENGINE)] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute the baseline even when cached.", rich_help_panel=_OUT)] = False,
    plot: Annotated[Optional[Path], typer.Option(help="Write PNG plots into this dir.", rich_help_panel=_OUT)] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.", rich_help_panel=_OUT)] = False,
    output_json: Annotated[Optional[Path], typer.Option(help="Also write the report to this file.", rich_help_panel=_OUT)] = None,
    show_config: Annotated[bool, typer.Option("--show-config", help="Print each setting and its source; exit.", rich_help_panel=_OUT)] = False,
    no_write: Annotated[bool, typer.Option("--no-write", help="Write no llmctl_eval.json into checkpoints.", rich_help_panel=_OUT)] = False,
) -> None:
    from llmctl.cli.eval_output import run_eval_command
    from llmctl.eval.plan import build_plan, resolve_eval_settings
    from llmctl.settings import EVAL_SECTIONS, print_settings

    models = tuple(models or ())
    settings = resolve_eval_settings(models, recipe, {
        "eval.dataset": dataset, "eval.window_len": window_len, "eval.stride": stride,
        "eval.num_windows": num_windows, "eval.limit": limit, "eval.num_fewshot": num_fewshot,
        "eval.kld_top_k": kld_top_k, "eval.max_ppl_increase": max_ppl_increase, "eval.max_kld": max_kld,
        "eval.min_top1_agreement": min_top1, "eval.min_recovery": min_recovery,
        "model.device": device, "model.dtype": dtype, "model.max_model_len": max_model_len,
        "model.seed": seed, "scheduler.max_num_seqs": batch_size,
        "scheduler.max_num_batched_tokens": max_num_batched_tokens, "cache.kv_cache_memory": kv_cache_memory,
        "parallel.tensor_parallel_size": tensor_parallel_size})
    if show_config:
        print_settings(settings, EVAL_SECTIONS)
        return
    plan = build_plan(models, baseline, tasks, settings, base_url=base_url, tokenizer=tokenizer, api_key=api_key,
                      no_cache=no_cache)
    code = run_eval_command(plan, plot=plot, as_json=json_output, output_json=output_json, write=not no_write)
    if code:
        raise typer.Exit(code)
