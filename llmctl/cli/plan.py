"""`llmctl plan`."""

from __future__ import annotations

from llmctl.cli.common import not_implemented


def plan() -> None:
    not_implemented("plan")
