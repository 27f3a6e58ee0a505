"""Soak (slow): `llmctl bench serve`'s client drives the real server on the CPU with 256
concurrent clients for LLMCTL_SOAK_S seconds (default 300), 10% of them hanging up mid-request.
After it: no 5xx, every KV block free, no per-request metric state, aborts counted.

    LLMCTL_SOAK_S=300 pytest -m slow tests/test_serve_soak.py -s

(the same load by hand: `llmctl serve` then
`llmctl bench serve --max-concurrency 256 --duration 300 --disconnect-fraction 0.1 --input-len 64 --output-len 32`)."""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest
import uvicorn
from servers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def test_soak_256_clients_with_disconnects(default_model_dir):
    from llmctl.bench.serve_client import ServeBenchConfig, benchmark
    from llmctl.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, ServeConfig
    from llmctl.engine.llm_engine import LLMEngine
    from llmctl.serve.launcher import build_app

    duration = float(os.environ.get("LLMCTL_SOAK_S", "300"))
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=str(default_model_dir), max_model_len=512),
                                    cache=CacheConfig(kv_cache_memory=256 * 2**20),
                                    scheduler=SchedulerConfig(max_num_seqs=64, max_waiting=512)))
    config = ServeConfig(port=free_port())
    app = build_app(engine, config)
    uv = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        assert thread.is_alive()
        time.sleep(0.05)
    url = f"http://127.0.0.1:{config.port}"
    try:
        # 512 prompts, cycled for the duration; counted with the model's own tokenizer files
        report = benchmark(ServeBenchConfig(base_url=url, num_prompts=512, input_len=64, output_len=32,
                                            tokenizer=str(default_model_dir),
                                            max_concurrency=256, duration_s=duration, disconnect_fraction=0.1, seed=0))
        deadline = time.time() + 120
        while engine.has_unfinished_requests() or app.state.ctx.engine.num_unfinished:
            assert time.time() < deadline
            time.sleep(0.2)
        stats = engine.get_stats()
        metrics = app.state.metrics
        text = httpx.get(url + "/metrics").text
        aborts = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith("llmctl:request_success_total") and 'finished_reason="abort"' in line)
        print(f"soak {duration:.0f} s: completed {report['completed']}, disconnected {report['disconnected']}, "
              f"failed {report['failed']}, 5xx {report['status_5xx']}, aborts counted {aborts:.0f}, "
              f"output tok/s {report['output_throughput']:.1f}, median TTFT {report['median_ttft_ms']:.0f} ms, "
              f"p99 E2EL {report.get('p99_e2el_ms', float('nan')):.0f} ms, free/total blocks "
              f"{stats.num_free_blocks}/{stats.num_total_blocks}, metric entries {metrics.num_tracked_requests}")
        assert report["status_5xx"] == 0 and report["failed"] == 0, report.get("errors")
        assert report["completed"] > 0 and report["disconnected"] > 0
        assert stats.num_free_blocks == stats.num_total_blocks
        assert metrics.num_tracked_requests == 0
        assert aborts >= report["disconnected"] * 0.9
    finally:
        uv.should_exit = True
        thread.join(60)
