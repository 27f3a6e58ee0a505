"""SIGTERM on a real `llmctl serve` process with requests that outlast the grace period: each
stream ends with an error event and [DONE], each non-streaming request gets an OpenAI-style
503, nothing is cut or answered 500, no traceback reaches the log, and the process exits 0."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from servers import free_port

ROOT = Path(__file__).resolve().parents[1]
GRACE_S = 2.0


def _stream(url: str) -> dict:
    body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 480, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=120) as c, c.stream("POST", url + "/v1/completions", json=body) as res:
        lines = [line for line in res.iter_lines() if line]
    return {"status": res.status_code, "lines": lines}


def _plain(url: str) -> dict:
    res = httpx.post(url + "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 480,
                                                    "ignore_eos": True}, timeout=120)
    return {"status": res.status_code, "body": res.json()}


def test_sigterm_past_the_grace_period_ends_every_request_cleanly(default_model_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmctl", "serve", str(default_model_dir), "--port", str(port),
         "--max-model-len", "512", "--kv-cache-memory", "64MiB", "--max-num-seqs", "8",
         "--shutdown-grace-s", str(GRACE_S), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not start"
            time.sleep(0.2)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            streams = [pool.submit(_stream, url) for _ in range(4)]
            plains = [pool.submit(_plain, url) for _ in range(4)]
            time.sleep(1.5)  # every request is running; 480 tokens each take far longer than the grace
            proc.send_signal(signal.SIGTERM)
            streams = [f.result(timeout=60) for f in streams]
            plains = [f.result(timeout=60) for f in plains]
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    for s in streams:
        assert s["status"] == 200 and s["lines"][-1] == "data: [DONE]", s["lines"][-3:]
        error = json.loads(s["lines"][-2][len("data: "):])
        assert error["object"] == "error" and error["error"]["code"] == 503, error
        assert "shut down" in error["error"]["message"]
    for p in plains:
        assert p["status"] == 503, p
        assert p["body"]["error"]["type"] == "server_error" and "shut down" in p["body"]["error"]["message"]
    assert "Traceback" not in stderr and "Cancel" not in stderr, stderr
    assert code == 0, stderr
