"""A real `llmctl serve` subprocess on a free loopback port, for the serving-benchmark tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

API_KEY = "bench-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(log: Path, *args: str, model: str = "default") -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "LLMCTL_API_KEY"}
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmctl", "serve", model, "--port", str(port), "--api-key", API_KEY,
             "--max-model-len", "256" if model != "default" else "512", "--kv-cache-memory", "64MiB",
             "--log-level", "warning", *args],
            stdout=subprocess.DEVNULL, stderr=err, env=env)
    return proc, f"http://127.0.0.1:{port}"


def wait_up(proc: subprocess.Popen, url: str, log: Path, timeout_s: float = 300.0) -> None:
    deadline = time.time() + timeout_s
    while True:
        assert proc.poll() is None, log.read_text()
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        assert time.time() < deadline, "server did not come up: " + log.read_text()
        time.sleep(0.3)


@contextlib.contextmanager
def servers(tmp: Path, *arg_lists: tuple[str, ...]) -> Iterator[list[str]]:
    """Start every server at once (they load in parallel), yield their URLs, stop them."""
    started = [start_server(tmp / f"serve{i}.log", *args) for i, args in enumerate(arg_lists)]
    try:
        for i, (proc, url) in enumerate(started):
            wait_up(proc, url, tmp / f"serve{i}.log")
        yield [url for _, url in started]
    finally:
        for proc, _ in started:
            proc.terminate()
        for proc, _ in started:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`llmctl ARGS` as a user runs it."""
    full_env = {k: v for k, v in os.environ.items() if k != "LLMCTL_API_KEY"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "llmctl", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout)


def ks_distance(sample, reference) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    import numpy as np

    a, b = np.sort(np.asarray(sample, float)), np.sort(np.asarray(reference, float))
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / a.size
    cdf_b = np.searchsorted(b, grid, side="right") / b.size
    return float(np.abs(cdf_a - cdf_b).max())


def percentile(values, p: float) -> float:
    """Linear interpolation between closest ranks, written out (numpy's default method)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * p / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
