"""Byte sizes in and out: `parse_size("2GiB")` for flags and recipes, `format_bytes` for
every table that prints one."""

from __future__ import annotations

import re

from llmctl.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
_MIN_BARE_SIZE = 2**20  # a number without a unit below this is a forgotten unit


def parse_size(value: str | int, name: str = "size") -> int:
    """'80GiB' -> 85899345920; '1.5GB' -> 1500000000; ints pass through."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a size like 16GiB, got {value!r}")
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(str(value))
    unit = (m.group(2) or "").lower() if m else None
    if not m or unit not in _UNITS:
        raise ConfigError(f"{name}: expected a size like 16GiB or 512MB, got {value!r}")
    size = int(float(m.group(1)) * _UNITS[unit])
    if not unit and size < _MIN_BARE_SIZE:
        # `--gpu-memory 80` meant 80GiB, not 80 bytes.
        raise ConfigError(f"{name}: {value!r} has no unit, so it reads as {size} bytes",
                          hint=f"give a unit: {m.group(1)}GiB, {m.group(1)}GB or {m.group(1)}MiB")
    return size


def format_bytes(num: int | float | None) -> str:
    """1536 -> '1.5 KiB', 3 * 2**30 -> '3.00 GiB'; None -> '-'."""
    if num is None:
        return "-"
    for unit in ("B", "KiB", "MiB"):
        if abs(num) < 1024:
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    return f"{num:.2f} GiB"
