"""AsyncEngine over the real LLMEngine (default model): streaming, aborts that free blocks,
per-request failures that leave the loop alive, the queue limit, and a dead engine."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from llmctl.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from llmctl.errors import InvalidRequestError
from llmctl.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def llm_engine(default_model_dir):
    from llmctl.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from llmctl.engine.llm_engine import LLMEngine

    config = EngineConfig(model=ModelConfig(model=str(default_model_dir), max_model_len=256),
                          cache=CacheConfig(kv_cache_memory=32 * 2**20),
                          scheduler=SchedulerConfig(max_num_seqs=4))
    return LLMEngine(config)


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def _drain(agen) -> list:
    return [out async for out in agen]


def _ids(engine, text: str) -> list[int]:
    return engine.tokenizer(text)["input_ids"]


def _free_equals_total(engine) -> bool:
    stats = engine.get_stats()
    return stats.num_free_blocks == stats.num_total_blocks and not engine.has_unfinished_requests()


def test_streams_cumulative_outputs_like_the_sync_engine(llm_engine):
    params = SamplingParams(temperature=0.0, max_tokens=8)
    prompts = ["The capital of France is", "Water boils at"]
    expected = {}
    for i, p in enumerate(prompts):
        llm_engine.add_request(f"sync-{i}", _ids(llm_engine, p), params)
    while llm_engine.has_unfinished_requests():
        for out in llm_engine.step():
            if out.finished:
                expected[out.request_id.removeprefix("sync-")] = out.outputs[0].token_ids

    async def main():
        front = AsyncEngine(llm_engine)
        front.start()
        try:
            runs = await asyncio.gather(*[_drain(front.generate(f"a-{i}", _ids(llm_engine, p), params))
                                          for i, p in enumerate(prompts)])
        finally:
            await front.shutdown()
        return runs

    for i, outs in enumerate(_run(main())):
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        assert lengths == sorted(lengths) and outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert outs[-1].outputs[0].token_ids == expected[str(i)]
    assert _free_equals_total(llm_engine)


def test_final_only_delivers_the_finished_output_and_the_hook_sees_every_step(llm_engine):
    """What non-streaming handlers ask for: one output, the same as the last cumulative one,
    while the step hook (the server's metrics) still sees the request's output at every step."""
    params = SamplingParams(temperature=0.0, max_tokens=6)
    ids = _ids(llm_engine, "The capital of France is")
    seen: list[int] = []

    def hook(stats, outputs):
        seen.extend(len(o.outputs[0].token_ids) for o in outputs if o.request_id == "final")

    async def main():
        front = AsyncEngine(llm_engine, step_hook=hook)
        front.start()
        try:
            return await asyncio.gather(_drain(front.generate("cumulative", ids, params)),
                                        _drain(front.generate("final", ids, params, final_only=True)))
        finally:
            await front.shutdown()

    cumulative, final = _run(main())
    assert len(cumulative) == 6 and len(final) == 1 and final[0].finished
    assert final[0].outputs[0].token_ids == cumulative[-1].outputs[0].token_ids
    assert final[0].outputs[0].text == cumulative[-1].outputs[0].text
    assert seen == [1, 2, 3, 4, 5, 6]
    assert _free_equals_total(llm_engine)


def test_cancelled_consumer_aborts_and_frees_blocks(llm_engine):
    async def main():
        front = AsyncEngine(llm_engine)
        front.start()
        params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        got_first = asyncio.Event()

        async def consume():
            async for _ in front.generate("long", _ids(llm_engine, "Count: 1, 2,"), params):
                got_first.set()

        task = asyncio.create_task(consume())
        await got_first.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert front.num_unfinished == 0
        for _ in range(200):  # the engine thread applies the abort before its next step
            if _free_equals_total(front.engine):
                break
            await asyncio.sleep(0.05)
        await front.shutdown()

    _run(main())
    assert _free_equals_total(llm_engine)


def test_a_failing_request_fails_alone(llm_engine):
    async def main():
        front = AsyncEngine(llm_engine)
        front.start()
        good = asyncio.create_task(_drain(front.generate("good", _ids(llm_engine, "Hello"),
                                                         SamplingParams(temperature=0.0, max_tokens=6))))
        with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
            await _drain(front.generate("bad", [10**7], SamplingParams(max_tokens=4)))
        outs = await good
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 6
        assert front.is_running
        await front.shutdown()

    _run(main())


def test_queue_limit(llm_engine):
    async def main():
        front = AsyncEngine(llm_engine, max_num_unfinished=2)
        front.start()
        params = SamplingParams(temperature=0.0, max_tokens=3)
        first = front.generate("q1", _ids(llm_engine, "a"), params)
        second = front.generate("q2", _ids(llm_engine, "b"), params)
        with pytest.raises(QueueFullError):
            front.generate("q3", _ids(llm_engine, "c"), params)
        await asyncio.gather(_drain(first), _drain(second))
        await _drain(front.generate("q4", _ids(llm_engine, "d"), params))  # room again
        await front.shutdown()

    _run(main())


def test_dead_engine_fails_requests_and_health(default_model_dir):
    """A broken model makes step() raise: waiting requests get EngineDeadError, /health 503."""
    from llmctl.config import CacheConfig, EngineConfig, ModelConfig, ServeConfig
    from llmctl.engine.llm_engine import LLMEngine
    from llmctl.serve.launcher import build_app

    engine = LLMEngine(EngineConfig(model=ModelConfig(model=str(default_model_dir), max_model_len=128),
                                    cache=CacheConfig(kv_cache_memory=8 * 2**20)))
    app = build_app(engine, ServeConfig())
    front = app.state.ctx.engine

    async def main():
        front.start()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            assert (await client.get("/health")).status_code == 200
            engine.runner.model = None  # every forward now fails
            with pytest.raises(EngineDeadError):
                await _drain(front.generate("doomed", _ids(engine, "Hi"), SamplingParams(max_tokens=4)))
            health = await client.get("/health")
            assert health.status_code == 503 and "engine loop died" in health.json()["error"]["message"]
            res = await client.post("/v1/completions", json={"prompt": "Hi"})
            assert res.status_code == 503 and res.json()["error"]["code"] == 503
        await front.shutdown()

    _run(main())
