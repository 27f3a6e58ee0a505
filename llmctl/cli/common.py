"""Shared bits of the subcommands: option types and the not-built-yet answer."""

from __future__ import annotations

from llmctl.errors import NotImplementedYet


def not_implemented(what: str) -> None:
    raise NotImplementedYet(f"`llmctl {what}` is not implemented yet", hint="see the README for what works today")


def examples(*lines: str) -> str:
    """The epilog every command's help ends with: two or three commands to copy."""
    return "[bold]Examples[/bold]\n\n" + "\n\n".join(f"  {line}" for line in lines)


def progress_bar(console, *fields: str, transient: bool = False):
    """The one progress bar of every long command: stage, bar, done/total, elapsed and ETA,
    then a text column per task field named in `fields` (e.g. "info", "live")."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn()]
    columns += [TextColumn(f"{{task.fields[{name}]}}") for name in fields]
    return Progress(*columns, console=console, transient=transient)
