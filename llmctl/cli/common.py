"""Shared bits of the subcommands: option types and the not-built-yet answer."""

from __future__ import annotations

from llmctl.errors import NotImplementedYet


def not_implemented(what: str) -> None:
    raise NotImplementedYet(f"`llmctl {what}` is not implemented yet", hint="see the README for what works today")


def examples(*lines: str) -> str:
    """The epilog every command's help ends with: two or three commands to copy."""
    return "[bold]Examples[/bold]\n\n" + "\n\n".join(f"  {line}" for line in lines)
