"""Helpers for tests that start a real `llmctl serve` process on loopback."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
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


@contextlib.contextmanager
def running_app(app, host: str = "127.0.0.1", port: int | None = None, sockets: list | None = None):
    """Run an ASGI app under uvicorn in a daemon thread for the block's duration."""
    import uvicorn

    uv = uvicorn.Server(uvicorn.Config(app, host=host, port=port or 8000, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": sockets} if sockets else {}, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not uv.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield uv
    finally:
        uv.should_exit = True
        thread.join(30)
