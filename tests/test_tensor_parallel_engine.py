"""The tensor-parallel engine on the CPU (gloo, three ranks, fp32) with the default model
(9 heads, 3 KV heads: one KV head per rank): the same tokens as one rank through prefix
hits, a preemption and n > 1; each rank allocates what `llmctl plan` says; a killed rank
ends generation with an error naming it and leaves no process; `llmctl serve
--tensor-parallel-size 3` answers the openai client and exits non-zero when a rank dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import psutil
import pytest
import torch
from servers import free_port, wait_healthy
from typer.testing import CliRunner

from llmctl.engine.distributed import TensorParallelError
from llmctl.llm import LLM
from llmctl.sampling_params import SamplingParams

BLOCKS = 24  # of 16 tokens: 8 prompts of ~30 tokens growing by 24 do not all fit -> preemption
KV_BYTES_PER_BLOCK_TP3 = 2 * 30 * 1 * 64 * 4 * 16  # layers x KV heads per rank x head_dim x fp32 x block
PREFIX = ("You are a careful assistant. Answer in one short sentence, with no preamble, "
          "and stop when the answer is complete.")
QUESTIONS = ["What is the capital of France?", "Name a prime number.", "What colour is the sky?",
             "How many legs has a spider?", "What is two plus two?", "Who wrote Hamlet?",
             "What is water made of?", "Name a planet."]


def _engine_args(tp: int) -> dict:
    return dict(device="cpu", tensor_parallel_size=tp, max_model_len=256, max_num_seqs=8,
                kv_cache_memory=BLOCKS * KV_BYTES_PER_BLOCK_TP3 * 3 // tp)


def _generate(llm: LLM) -> list[list[list[int]]]:
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True) for _ in QUESTIONS]
    params[3] = SamplingParams(n=2, temperature=0.8, seed=7, max_tokens=24, ignore_eos=True)
    outs = llm.generate([f"{PREFIX} {q}" for q in QUESTIONS], params)
    return [[list(c.token_ids) for c in o.outputs] for o in outs]


def _alive(procs) -> list[int]:
    return [p.pid for p in procs if p.poll() is None]


def test_tp3_matches_tp1_allocates_the_plan_and_fails_fast_on_a_dead_rank(default_model_dir):
    one = LLM("default", **_engine_args(1))
    try:
        expected = _generate(one)
    finally:
        one.shutdown()
    llm = LLM("default", **_engine_args(3))
    workers = list(llm.engine.tp_runtime.workers.procs.values())
    try:
        assert llm.engine.kv_plan.num_blocks == BLOCKS
        assert _generate(llm) == expected
        stats = llm.engine.get_stats()
        assert stats.prefix_cache_hits > 0 and stats.num_preemptions > 0

        # Each rank holds what the plan computes, before a byte is loaded.
        plan = json.loads(CliRunner().invoke(_cli(), [
            "plan", "default", "--device", "cpu", "--tensor-parallel-size", "3", "--max-model-len", "256",
            "--kv-cache-memory", str(BLOCKS * KV_BYTES_PER_BLOCK_TP3), "--json"]).stdout)
        ranks = llm.engine.runner.memory_per_rank()
        assert len(ranks) == 3
        for rank in ranks:
            assert rank["weight_bytes"] == plan["weight_bytes_rank"]
            assert rank["kv_cache_bytes"] == plan["kv_cache_bytes_allocated"] == BLOCKS * KV_BYTES_PER_BLOCK_TP3

        # A rank killed mid-generation: generate raises naming it, within seconds.
        timer = threading.Timer(1.0, os.kill, (workers[1].pid, signal.SIGKILL))
        timer.start()
        with pytest.raises(TensorParallelError, match=r"tensor-parallel rank 2 died \(killed by SIGKILL\)"):
            llm.generate(["Count to a thousand:"], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        timer.join()
    finally:
        llm.shutdown()
    assert _alive(workers) == []


def _cli():
    from llmctl.cli.main import app

    return app


def test_serve_tp3_answers_openai_and_exits_nonzero_when_a_rank_dies(default_model_dir, tmp_path):
    from openai import APIError, OpenAI

    port = free_port()
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmctl", "serve", "default", "--port", str(port), "--device", "cpu",
             "--tensor-parallel-size", "3", "--max-model-len", "256", "--kv-cache-memory", "16MiB",
             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log, 300, 0.5)
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=120, max_retries=0)
        reply = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=8, temperature=0)
        assert reply.choices[0].message.content and reply.usage.completion_tokens == 8

        threading.Timer(1.0, workers[0].kill).start()
        with pytest.raises(APIError):
            client.completions.create(model="default", prompt="Count to a thousand:", max_tokens=200,
                                      temperature=0, extra_body={"ignore_eos": True})
        assert proc.wait(timeout=60) != 0
        assert "tensor-parallel rank" in log.read_text() and "died" in log.read_text()
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ranks_that_do_not_join_in_time_fail_with_a_clear_error(default_model_dir, monkeypatch):
    """A rank that never reports in (here: a join timeout no load can meet) is an error, not a
    hang, and the ranks already started are stopped."""
    monkeypatch.setenv("LLMCTL_TP_JOIN_TIMEOUT", "0.01")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(TensorParallelError, match=r"did not (load and )?(all )?join"):
        LLM("default", **_engine_args(3))
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []


@pytest.mark.parametrize("tp", [1, 2])
def test_plan_equals_what_each_rank_holds_for_a_gptq_checkpoint_on_the_cpu(tiny_gptq_dir, tp):
    """On the CPU a GPTQ checkpoint is dequantized once at load: each rank holds the dense copy
    in the compute dtype (the 4-bit codes are dropped), and the plan counts exactly that."""
    kv = str(4 * 2**20)
    result = CliRunner().invoke(_cli(), ["plan", str(tiny_gptq_dir), "--device", "cpu", "--tensor-parallel-size",
                                         str(tp), "--max-model-len", "256", "--kv-cache-memory", kv, "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    llm = LLM(str(tiny_gptq_dir), device="cpu", tensor_parallel_size=tp, max_model_len=256, kv_cache_memory=int(kv))
    try:
        ranks = llm.engine.runner.memory_per_rank()
        dense = [m.dense_weight for m in llm.engine.model.modules() if getattr(m, "dense_weight", None) is not None]
    finally:
        llm.shutdown()
    assert len(ranks) == tp and len(dense) == 2 * 4  # qkv, o, gate_up, down per layer
    assert all(w.dtype == torch.float32 for w in dense)
    for rank in ranks:
        assert rank["weight_bytes"] == plan["weight_bytes_rank"]
        assert rank["kv_cache_bytes"] == plan["kv_cache_bytes_allocated"]
    if tp == 1:  # one rank holds the whole dense model: the plan's "weights loaded"
        assert plan["weight_bytes_rank"] == plan["weight_bytes_loaded"]
