"""`llmctl serve`."""

from __future__ import annotations

from llmctl.cli.common import not_implemented


def serve() -> None:
    not_implemented("serve")
