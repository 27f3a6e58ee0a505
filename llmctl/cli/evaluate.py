"""`llmctl eval`."""

from __future__ import annotations

from llmctl.cli.common import not_implemented


def evaluate() -> None:
    not_implemented("eval")
