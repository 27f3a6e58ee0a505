"""`llmctl serve --tensor-parallel-size 2` on the CPU (gloo; a 2-layer random Llama with 4 heads
and 2 KV heads, and the default model's tokenizer) and what ends it:
SIGTERM to the server and Ctrl-C (SIGINT to its process group) stop every rank and exit 0; a
rank that dies while the server idles makes /health answer 503 naming the rank, and `serve`
exit non-zero, with no process left behind. (A rank killed mid-request:
tests/test_tensor_parallel_engine.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest
from servers import free_port, running_app, wait_healthy

ENGINE_FLAGS = ["--device", "cpu", "--tensor-parallel-size", "2", "--max-model-len", "256",
                "--kv-cache-memory", "16MiB"]


def _serve(model_dir, tmp_path, **popen_kw) -> tuple[subprocess.Popen, str, object, list[psutil.Process]]:
    """A healthy `llmctl serve -tp 2` process, its URL, its stderr log and its ranks' processes."""
    port = free_port()
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "llmctl", "serve", str(model_dir), "--port", str(port), *ENGINE_FLAGS,
                                 "--shutdown-grace-s", "2", "--log-level", "warning"],
                                stdout=subprocess.DEVNULL, stderr=err, **popen_kw)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log, 300, 0.5)
    except BaseException:
        _kill(proc)
        raise
    ranks = psutil.Process(proc.pid).children(recursive=True)
    assert len(ranks) == 1, [p.cmdline() for p in ranks]  # rank 1; rank 0 is the server itself
    return proc, url, log, ranks


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _left(procs: list[psutil.Process], timeout_s: float = 10.0) -> list[int]:
    """The pids of `procs` still running (zombies aside) after up to `timeout_s`."""
    deadline = time.time() + timeout_s
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p.pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.1)


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_serve_tp2_stops_every_rank_on_sigterm_and_ctrl_c(tiny_llama_dir, tmp_path, how):
    # Ctrl-C in a terminal sends SIGINT to the whole foreground process group, ranks included;
    # a supervisor's SIGTERM reaches the server's pid only.
    proc, url, log, ranks = _serve(tiny_llama_dir, tmp_path, start_new_session=True)
    try:
        if how == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0, log.read_text()
        assert _left(ranks) == [], log.read_text()
    finally:
        _kill(proc)
        for p in ranks:
            if p.is_running():
                p.kill()


def test_serve_tp2_exits_nonzero_when_a_rank_dies_while_idle(tiny_llama_dir, tmp_path):
    proc, url, log, ranks = _serve(tiny_llama_dir, tmp_path)
    try:
        ranks[0].kill()
        assert proc.wait(timeout=60) != 0
        text = log.read_text()
        assert "tensor-parallel rank 1 died (killed by SIGKILL)" in text, text
        assert _left(ranks) == []
    finally:
        _kill(proc)


def test_health_answers_503_naming_the_rank_when_a_rank_dies(tiny_llama_dir):
    """The server's app over a two-rank engine, kept running after the death (`serve` itself
    exits then, so its 503 lasts only until it stops accepting connections)."""
    from llmctl.config import ServeConfig
    from llmctl.engine.llm_engine import LLMEngine
    from llmctl.serve.launcher import build_app

    engine = LLMEngine.from_engine_args(str(tiny_llama_dir), device="cpu", tensor_parallel_size=2, max_model_len=256,
                                        kv_cache_memory="16MiB")
    ranks = [psutil.Process(p.pid) for p in engine.tp_runtime.workers.procs.values()]
    config = ServeConfig(port=free_port())
    url = f"http://127.0.0.1:{config.port}"
    try:
        with running_app(build_app(engine, config), config.host, config.port):
            assert httpx.get(url + "/health", timeout=10).status_code == 200
            ranks[0].kill()
            deadline = time.time() + 30
            while (health := httpx.get(url + "/health", timeout=10)).status_code == 200:
                assert time.time() < deadline, "/health still answers 200 after a rank died"
                time.sleep(0.05)
            assert health.status_code == 503
            assert "tensor-parallel rank 1 died (killed by SIGKILL)" in health.json()["error"]["message"]
            reply = httpx.post(url + "/v1/completions", json={"model": str(tiny_llama_dir), "prompt": "Hi", "max_tokens": 4},
                               timeout=30)
            assert reply.status_code == 503, reply.text
    finally:
        engine.shutdown()
    assert _left(ranks) == []
