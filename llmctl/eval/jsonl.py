"""Reading a local JSONL file of objects, with errors that name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path

from llmctl.errors import ConfigError


def read_jsonl(path: Path, what: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of `path`; `what` names the file's role in errors."""
    if not path.is_file():
        raise ConfigError(f"{what}: {path} does not exist")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{what}: {path} line {number} is not JSON: {err.msg}") from err
        if not isinstance(row, dict):
            raise ConfigError(f"{what}: {path} line {number} is not a JSON object")
        rows.append((number, row))
    if not rows:
        raise ConfigError(f"{what}: {path} has no documents")
    return rows
