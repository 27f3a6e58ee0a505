"""`llmctl serve` as a user runs it: a subprocess on a free loopback port, the API key from
LLMCTL_API_KEY, the plan printed at start, and SIGTERM with a request in flight: the
request completes, the process exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import httpx
import pytest
from servers import free_port, wait_healthy

KEY = "cli-key"


@pytest.fixture(scope="module")
def served(default_model_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    env = {**os.environ, "LLMCTL_API_KEY": KEY}
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmctl", "serve", str(default_model_dir), "--port", str(port),
             "--max-model-len", "256", "--kv-cache-memory", "32MiB", "--max-num-seqs", "4",
             "--served-model-name", "smol", "--shutdown-grace-s", "60", "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=err, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, log, 120, 0.3)
    yield {"url": url, "proc": proc, "log": log}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_start_prints_the_plan_and_binds_loopback(served):
    text = served["log"].read_text()
    assert "KV blocks" in text and "max concurrency" in text
    assert f"on http://127.0.0.1:{served['url'].rsplit(':', 1)[1]}/v1 (API key required)" in text


def test_api_key_from_environment(served):
    url = served["url"]
    assert httpx.get(url + "/v1/models").status_code == 401
    models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert [m["id"] for m in models["data"]] == ["smol"]


def test_sigterm_finishes_in_flight_then_exits_zero(served):
    lines: list[str] = []
    started = threading.Event()

    def stream() -> None:
        body = {"model": "smol", "prompt": "Count: 1, 2,", "max_tokens": 40, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", served["url"] + "/v1/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {KEY}"}) as res:
            for line in res.iter_lines():
                if line:
                    lines.append(line)
                    started.set()

    client = threading.Thread(target=stream)
    client.start()
    assert started.wait(60)
    served["proc"].send_signal(signal.SIGTERM)
    assert served["proc"].wait(120) == 0, served["log"].read_text()
    client.join(60)
    assert lines[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in lines[-2]
    with pytest.raises(httpx.TransportError):  # nothing listens any more
        httpx.get(served["url"] + "/health", timeout=2)
