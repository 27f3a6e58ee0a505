"""Agreement with a peer client: GuideLLM (the `peer` extra) and `llmctl bench serve` load
the same llmctl server at the same constant rate with the same lengths, at the same time
(so that a busy machine's noise falls on both alike: run one after the other on the
shared 2-core box, the same client's medians moved 3-7x from run to run), and report
request throughput and median TTFT / TPOT within 10% of each other. GuideLLM's
inter-token latency is vLLM's TPOT ((latency - TTFT) / (output tokens - 1)); its own
"time per output token" divides the whole latency by every token."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import time

import pytest
from bench_serve_helpers import API_KEY, servers

from llmctl.bench.peer import guidellm_command, read_guidellm
from llmctl.bench.serve_client import ServeBenchConfig, benchmark

pytestmark = pytest.mark.interop
RATE, NUM, IN_LEN, OUT_LEN = 0.5, 20, 32, 8


def _guidellm_start(url: str, model_dir, out) -> subprocess.Popen:
    if importlib.util.find_spec("guidellm") is None:
        pytest.skip("guidellm is not installed (pip install 'llmctl[peer]')")
    cmd = guidellm_command(url, "default", model_dir, RATE, NUM, IN_LEN, OUT_LEN, out, api_key=API_KEY)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _guidellm_result(proc: subprocess.Popen, out) -> dict:
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    return read_guidellm(out)


def _wait_for_first_request(url: str, proc: subprocess.Popen) -> None:
    """Until the server has taken a prompt (guidellm's first request)."""
    import httpx

    from llmctl.bench.scrape import parse_prometheus

    def prompts() -> float:
        return parse_prometheus(httpx.get(url + "/metrics", timeout=10).text).get("prompt_tokens_total", 0.0)

    before, deadline = prompts(), time.time() + 300
    while prompts() == before:
        assert proc.poll() is None and time.time() < deadline, "guidellm sent nothing"
        time.sleep(0.2)


def _llmctl(url: str, seed: int) -> dict:
    s = benchmark(ServeBenchConfig(base_url=url, api_key=API_KEY, num_prompts=NUM, input_len=IN_LEN,
                                   output_len=OUT_LEN, request_rate=RATE, arrival="constant", seed=seed))
    return {k: s[k] for k in ("request_throughput", "completed", "median_ttft_ms", "median_tpot_ms")} | {
        "mean_prompt_len": s["workload"]["mean_prompt_len"]}


def test_agrees_with_guidellm(tmp_path_factory, default_model_dir):
    tmp = tmp_path_factory.mktemp("peer")
    # GuideLLM draws the same prompts every run (its seed is fixed at 42): with the prefix
    # cache on, its second run would be served from what its first one left.
    with servers(tmp, ("--max-num-seqs", "16", "--no-enable-prefix-caching")) as (url,):
        runs = {"guidellm": [], "llmctl": []}
        for k in range(2):
            proc = _guidellm_start(url, default_model_dir, tmp / f"g{k}.json")
            _wait_for_first_request(url, proc)  # guidellm takes a while to start; then both run
            runs["llmctl"].append(_llmctl(url, seed=k))
            runs["guidellm"].append(_guidellm_result(proc, tmp / f"g{k}.json"))
    keys = ("request_throughput", "completed", "median_ttft_ms", "median_tpot_ms", "mean_prompt_len")
    mean = {who: {key: sum(r[key] for r in rs) / len(rs) for key in keys} for who, rs in runs.items()}
    print(json.dumps({"runs": runs, "mean": mean}, indent=1))
    assert mean["guidellm"]["completed"] == mean["llmctl"]["completed"] == NUM
    for key in ("request_throughput", "median_ttft_ms", "median_tpot_ms"):
        peer, ours = mean["guidellm"][key], mean["llmctl"][key]
        assert abs(ours / peer - 1.0) <= 0.10, f"{key}: llmctl {ours:.2f} vs guidellm {peer:.2f}"
