"""Helpers for tests that start a real `llmctl serve` process on loopback."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout_s: float, interval_s: float = 0.3) -> None:
    """Wait until `url`/health answers 200; fail with the server's log if it exits or times out."""
    deadline = time.time() + timeout_s
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "server did not come up: " + log.read_text()
        time.sleep(interval_s)
