"""`llmctl quantize`."""

from __future__ import annotations

from llmctl.cli.common import not_implemented


def quantize() -> None:
    not_implemented("quantize")
