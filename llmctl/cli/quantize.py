"""`llmctl quantize`: GPTQ a model into a standard GPTQ checkpoint, then check it on held-out text."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from llmctl.cli.common import progress_bar

_GPTQ = "GPTQ"
_CALIB = "Calibration"
_OUT = "Output"
EXAMPLES = (
    "llmctl quantize default -o smollm2-gptq",
    "llmctl quantize ./Llama-3-8B -o llama3-gptq --recipe recipes/llama3-8b.yaml",
    "llmctl quantize default -o q --num-samples 8 --seq-len 256 --no-eval",
)


def quantize(
    model: Annotated[Optional[str], typer.Argument(help="Model dir (HF layout) or `default`.")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="New checkpoint dir.", rich_help_panel=_OUT)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing checkpoint dir.", rich_help_panel=_OUT)] = False,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip the check: llmctl eval of OUT against MODEL.", rich_help_panel=_OUT)] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.", rich_help_panel=_OUT)] = False,
    recipe: Annotated[Optional[str], typer.Option("--recipe", help="Recipe YAML giving the defaults \\[default: the default model's own].")] = None,
    bits: Annotated[Optional[int], typer.Option(help="2, 3, 4 or 8. \\[default: 4]", rich_help_panel=_GPTQ)] = None,
    group_size: Annotated[Optional[int], typer.Option(help="Columns per scale; -1: one group. \\[default: 128]", rich_help_panel=_GPTQ)] = None,
    desc_act: Annotated[Optional[bool], typer.Option("--desc-act/--no-desc-act", help="Act-order (stores g_idx).", rich_help_panel=_GPTQ)] = None,
    sym: Annotated[Optional[bool], typer.Option("--sym/--asym", help="Symmetric grid (gptq) or not (gptq_v2).", rich_help_panel=_GPTQ)] = None,
    damp_percent: Annotated[Optional[float], typer.Option(help="Hessian dampening. \\[default: 0.01]", rich_help_panel=_GPTQ)] = None,
    static_groups: Annotated[Optional[bool], typer.Option("--static-groups/--no-static-groups", help="Fix group grids first.", rich_help_panel=_GPTQ)] = None,
    true_sequential: Annotated[Optional[bool], typer.Option("--true-sequential/--no-true-sequential", help="Sub-layers in turn.", rich_help_panel=_GPTQ)] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Local .txt/.json/.jsonl/.parquet/.csv file or dir. \\[default: embedded corpus]", rich_help_panel=_CALIB)] = None,
    num_samples: Annotated[Optional[int], typer.Option(help="Calibration sequences. \\[default: 128]", rich_help_panel=_CALIB)] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Tokens per sequence. \\[default: 2048]", rich_help_panel=_CALIB)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the text sample. \\[default: 0]", rich_help_panel=_CALIB)] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N. \\[default: auto]")] = None,
    show_config: Annotated[bool, typer.Option("--show-config", help="Print each setting and its source; exit.")] = False,
) -> None:
    import time

    from llmctl.errors import ConfigError
    from llmctl.settings import QUANTIZE_SECTIONS, print_settings, resolve

    start = time.perf_counter()
    if recipe is None and model in (None, "default"):
        recipe = default_model_recipe()
    settings = resolve(model, {
        "quantize.bits": bits, "quantize.group_size": group_size, "quantize.desc_act": desc_act, "quantize.sym": sym,
        "quantize.damp_percent": damp_percent, "quantize.static_groups": static_groups,
        "quantize.true_sequential": true_sequential, "quantize.dataset": dataset,
        "quantize.num_samples": num_samples, "quantize.seq_len": seq_len, "quantize.seed": seed,
        "model.device": device}, recipe=recipe)
    if show_config:
        print_settings(settings, QUANTIZE_SECTIONS)
        return
    if output is None:
        raise ConfigError("--output: where to write the checkpoint is required", hint="llmctl quantize MODEL -o OUT_DIR")
    model_config = settings.model
    if recipe is not None and not json_output:
        typer.echo(f"recipe: {recipe}", err=True)
    _run(model_config.model, output, settings.quant, settings.eval, model_config.device, overwrite, not no_eval,
         json_output, start)


def default_model_recipe() -> str | None:
    """The shipped recipe of the embedded default model (its group size 64 divides the hidden
    size 576, which the generic default 128 does not), when the recipes are beside the package."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "recipes" / "smollm2-135m.yaml"
    return str(path) if path.is_file() else None


def _run(model_arg, output, config, eval_config, device, overwrite, run_eval, json_output, start: float) -> None:
    from pathlib import Path

    from rich.console import Console

    from llmctl.models.loader import resolve_model_path
    from llmctl.quant.run import quantize_checkpoint, validate_request

    console = Console(stderr=True, highlight=False)
    model_dir = resolve_model_path(model_arg)
    # Every input check before any weight is read.
    validate_request(model_dir, Path(output), config, overwrite)
    with _Progress(console) as progress:
        summary = quantize_checkpoint(
            model_dir, output, config, device=device, overwrite=overwrite, run_eval=run_eval,
            on_stage=progress.stage, on_layer=progress.layer, eval_config=eval_config)
    import time

    summary.seconds = time.perf_counter() - start  # the whole command, model conversion included
    if json_output:
        typer.echo(json.dumps(summary.to_dict(), indent=2, default=str))
    else:
        _print_summary(Console(highlight=False), summary)
    check_gate(summary)


def check_gate(summary) -> None:
    """A checkpoint that fails its recipe's accuracy gate ends the command with the gate's exit
    code (llmctl.eval.gate.EXIT_GATE_FAILED, as `llmctl eval`), naming what failed."""
    from rich.console import Console

    from llmctl.eval.gate import EXIT_GATE_FAILED

    ev = summary.eval
    if not ev or ev.get("passed") is not False:
        return
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    console.print(f"[bold red]accuracy gate FAILED:[/] {'; '.join(ev['failing'])}")
    console.print(f"[dim]hint: the checkpoint is in {summary.output}, with the numbers in llmctl_eval.json; try "
                  "more bits, a smaller --group-size or more calibration data[/]")
    raise typer.Exit(EXIT_GATE_FAILED)


class _Progress:
    """Rich bars on stderr: one per stage, one for the layers with each layer's GPTQ loss."""

    _LABELS = {"load": "loading", "calibration": "calibration data", "eval": "held-out check"}

    def __init__(self, console) -> None:
        self.bar = progress_bar(console, "info")
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> "_Progress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def stage(self, name: str, done: int, total: int) -> None:
        if name not in self.tasks:
            self.tasks[name] = self.bar.add_task(self._LABELS.get(name, name), total=total, info="")
        self.bar.update(self.tasks[name], completed=done, total=total)

    def layer(self, report) -> None:
        if "layers" not in self.tasks:
            self.tasks["layers"] = self.bar.add_task("GPTQ layers", total=report.num_layers, info="")
        losses = " ".join(f"{name.split('.')[-1].removesuffix('_proj')}={loss:.2e}" for name, loss in report.losses.items())
        self.bar.update(self.tasks["layers"], completed=report.index + 1, info=f"layer {report.index}: {losses}")
        self.bar.console.print(f"layer {report.index:>3}  {report.seconds:6.1f}s  {losses}", markup=False)


def _print_summary(console, summary) -> None:
    from rich.table import Table

    from llmctl.units import format_bytes

    table = Table(title=f"GPTQ {summary.bits}-bit, group {summary.group_size} -> {summary.output}")
    table.add_column("")
    table.add_column("value", justify="right")
    rows = [("format", summary.checkpoint_format),
            ("calibration", f"{summary.num_samples} x {summary.seq_len} tokens"),
            ("size before", format_bytes(summary.source_bytes)), ("size after", format_bytes(summary.output_bytes)),
            ("compression", f"{summary.compression:.2f}x"), ("time", f"{summary.seconds:.1f} s"),
            ("  of which", ", ".join(f"{k} {v:.1f} s" for k, v in summary.stage_seconds.items())),
            ("peak memory", f"{format_bytes(summary.peak_memory_bytes)} ({summary.device})")]
    ev = summary.eval
    if ev:
        m = ev["metrics"]
        rows += [("perplexity original", f"{m['ppl_base']:.3f}"), ("perplexity quantized", f"{m['ppl']:.3f}"),
                 ("KL(original || quantized)", f"{m['kld_mean']:.4f}"), ("top-1 agreement", f"{m['same_top1']:.1%}"),
                 ("gate", {True: "PASSED", False: "FAILED", None: "no thresholds"}[ev.get("passed")])]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
