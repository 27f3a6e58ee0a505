"""A fault inside a step fails the request it belongs to, frees its blocks, and the engine
serves on; only an unusable engine dies, and then the server stops with an error.
Real engine on the default model; the faults are forced where the product would meet them."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
import torch
from servers import free_port

from llmctl.engine.async_engine import AsyncEngine
from llmctl.errors import EngineDeadError, InvalidRequestError, RequestFailedError
from llmctl.sampling_params import SamplingParams

MARK = [504, 505, 506]  # prompts starting with these token ids fail their prompt logprobs


@pytest.fixture(scope="module")
def engine(default_model_dir):
    from llmctl.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from llmctl.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=ModelConfig(model=str(default_model_dir), max_model_len=256),
                                  cache=CacheConfig(kv_cache_memory=16 * 2**20),
                                  scheduler=SchedulerConfig(max_num_seqs=4)))


@pytest.fixture
def oom_on_marked_prompts(monkeypatch):
    """Prompt logprobs of a marked prompt run out of memory, as a huge prompt's would on a GPU."""
    import llmctl.engine.model_runner as model_runner

    real = model_runner.compute_prompt_logprobs

    def compute(logits, prompt_token_ids, num_logprobs, start=0):
        if list(prompt_token_ids[:3]) == MARK:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (forced by the test)")
        return real(logits, prompt_token_ids, num_logprobs, start)

    monkeypatch.setattr(model_runner, "compute_prompt_logprobs", compute)


def _idle(engine) -> bool:
    stats = engine.get_stats()
    return stats.num_free_blocks == stats.num_total_blocks and not engine.has_unfinished_requests()


def test_out_of_memory_in_prompt_logprobs_fails_that_request_alone(engine, oom_on_marked_prompts):
    good = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    engine.add_request("good", [1, 2, 3, 4, 5], good)
    engine.add_request("bad", MARK + [7, 8, 9], SamplingParams(max_tokens=4, prompt_logprobs=1))
    engine.add_request("good-lp", [9, 10, 11, 12], SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=2))
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    bad = finished["bad"]
    assert isinstance(bad.error, RequestFailedError) and "out of memory" in str(bad.error)
    assert [c.finish_reason for c in bad.outputs] == ["abort"]
    assert finished["good"].error is None and len(finished["good"].outputs[0].token_ids) == 8
    assert finished["good-lp"].error is None and len(finished["good-lp"].prompt_logprobs) == 4
    assert _idle(engine)


def test_a_value_that_slipped_past_admission_fails_its_request_alone(engine):
    """A stop id outside the vocabulary put straight into the scheduler (past add_request's
    admission) reaches the sampler's invariant check inside the step."""
    from llmctl.engine.engine_request import EngineRequest

    params = SamplingParams(min_tokens=2, stop_token_ids=[10**9], max_tokens=4)
    seqs = engine.scheduler.add_request("smuggled", [1, 2, 3], params)
    request = EngineRequest("smuggled", None, seqs, engine.tokenizer, engine.device, time.time())
    engine._requests["smuggled"] = request
    for seq in seqs:
        engine._seq_to_request[seq.seq_id] = request
    engine.add_request("neighbour", [4, 5, 6], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert isinstance(finished["smuggled"].error, InvalidRequestError)
    assert "stop_token_ids" in str(finished["smuggled"].error)
    assert len(finished["neighbour"].outputs[0].token_ids) == 5 and finished["neighbour"].error is None
    assert _idle(engine)


def test_async_engine_fails_the_request_and_serves_the_concurrent_one(engine, oom_on_marked_prompts):
    async def main():
        front = AsyncEngine(engine)
        front.start()
        good = [o async for o in front.generate("g", [1, 2, 3, 4], SamplingParams(temperature=0.0, max_tokens=6,
                                                                                   ignore_eos=True))]
        with pytest.raises(RequestFailedError, match="out of memory"):
            async for _ in front.generate("b", MARK + [1], SamplingParams(max_tokens=4, prompt_logprobs=0)):
                pass
        assert front.is_running and front.dead_error is None
        await front.shutdown()
        return good

    good = asyncio.run(asyncio.wait_for(main(), 120))
    assert len(good[-1].outputs[0].token_ids) == 6 and _idle(engine)


def test_a_dead_engine_stops_the_server_with_an_error(default_model_dir):
    """A broken model (every forward raises TypeError) is not a request's fault: the request
    gets 503, /health says why, and run_server returns by raising, so `llmctl serve` exits 1."""
    from llmctl.config import CacheConfig, EngineConfig, ModelConfig, ServeConfig
    from llmctl.engine.llm_engine import LLMEngine
    from llmctl.serve.api_server import run_server
    from llmctl.serve.launcher import build_app

    engine = LLMEngine(EngineConfig(model=ModelConfig(model=str(default_model_dir), max_model_len=128),
                                    cache=CacheConfig(kv_cache_memory=8 * 2**20)))
    config = ServeConfig(port=free_port(), shutdown_grace_s=2)
    app = build_app(engine, config)
    raised: list[BaseException] = []

    def serve():
        try:
            run_server(app, config, log_level="critical")
        except BaseException as err:  # noqa: BLE001 - the test inspects it
            raised.append(err)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{config.port}"
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.1)
    engine.runner.model = None
    res = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
    assert res.status_code == 503 and res.json()["error"]["code"] == 503
    assert "Traceback" not in res.text and "NoneType" not in res.text
    thread.join(30)
    assert not thread.is_alive()
    assert len(raised) == 1 and isinstance(raised[0], EngineDeadError) and "TypeError" in str(raised[0])


def test_llm_score_raises_the_error_of_a_failed_scoring_request(default_model_dir):
    """A scoring request whose step fails raises from LLM.score (it used to come back as an
    empty score), and the engine is left idle for the next call."""
    from llmctl.engine.scoring import target_logprobs
    from llmctl.llm import LLM

    def scorer(logprobs, targets, first):
        if targets.numel() and int(targets[0]) == MARK[1]:
            raise torch.OutOfMemoryError("CUDA out of memory (forced by the test)")
        return target_logprobs(logprobs, targets, first)

    llm = LLM(str(default_model_dir), max_model_len=256, kv_cache_memory="16MiB")
    with pytest.raises(RequestFailedError, match="out of memory"):
        llm.score([[1, 2, 3, 4], MARK + [7, 8]], scorer=scorer)
    assert _idle(llm.engine)
    good = llm.score([[1, 2, 3, 4]], scorer=scorer)[0]
    assert good["logprob"].shape == (3,)
