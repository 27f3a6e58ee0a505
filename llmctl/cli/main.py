"""The `llmctl` entry point: registers the subcommands and prints errors one way.

Nothing heavy is imported here: `llmctl --help` must answer without torch.
"""

from __future__ import annotations

import os
import sys

import typer

from llmctl.cli import bench, evaluate, models, plan, quantize, serve
from llmctl.cli.common import examples
from llmctl.errors import LlmctlError
from llmctl.version import __version__


def _keep_option_names_whole() -> None:
    """Typer's option tables leave every column wrappable, so at 80 columns rich shrinks the
    widest ones first, which are the option names (`--max-num-batched-t…`). Names and types
    never wrap here; the help text wraps instead."""
    from rich.table import Table
    from typer import rich_utils

    class _OptionsTable(Table):
        def add_row(self, *cells, **kwargs) -> None:
            super().add_row(*cells, **kwargs)
            for column in self.columns[:-1]:
                column.no_wrap = True

    rich_utils.Table = _OptionsTable


_keep_option_names_whole()
app = typer.Typer(
    name="llmctl",
    help="From open LLM weights to a measured production server: quantize, eval, serve, bench.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
app.command("quantize", help="GPTQ-compress a model to 2/3/4/8 bits into a standard GPTQ checkpoint.",
            epilog=examples(*quantize.EXAMPLES))(quantize.quantize)
app.command("eval", help=evaluate.HELP, epilog=examples(*evaluate.EXAMPLES))(evaluate.evaluate)
app.command("serve", help="Run an OpenAI-compatible HTTP server on llmctl's engine.",
            epilog=examples(*serve.EXAMPLES))(serve.serve)
app.add_typer(bench.app, name="bench", help="Measure throughput, serving latency and kernels.")
app.command("models", help="Show the embedded default model and its cache, or inspect a local model dir.",
            epilog=examples(*models.EXAMPLES))(models.models)
app.command("plan", help="Plan KV-cache memory and concurrency for a model before loading any weights.",
            epilog=examples(*plan.EXAMPLES))(plan.plan)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"llmctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Print the version."),
) -> None:
    if os.environ.get("LLMCTL_DEBUG") != "1":
        silence_third_party_progress()


def silence_third_party_progress() -> None:
    """llmctl draws its own bars with ETAs; transformers', huggingface_hub's and datasets'
    tqdm bars (weight loading, data files) would interleave with them. LLMCTL_DEBUG=1 keeps them."""
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:  # imported before the variables were set: tell it directly
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def report_error(err: LlmctlError) -> None:
    """One red line on stderr, plus a hint when there is one."""
    from rich.console import Console

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    console.print(f"[bold red]error:[/] {err}", markup=True)
    if err.hint:
        console.print(f"[dim]hint: {err.hint}[/]")


def main() -> None:
    try:
        app()
    except LlmctlError as err:
        if os.environ.get("LLMCTL_DEBUG") == "1":
            raise
        report_error(err)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
