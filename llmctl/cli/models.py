"""`llmctl models`."""

from __future__ import annotations

from llmctl.cli.common import not_implemented


def models() -> None:
    not_implemented("models")
