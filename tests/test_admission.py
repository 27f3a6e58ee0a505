"""Admission: every per-request limit is refused by `LLMEngine.add_request` before the request
enters the engine, with an error that names the field; nothing is left behind."""

from __future__ import annotations

import pytest

from llmctl.engine import admission
from llmctl.errors import InvalidRequestError
from llmctl.sampling_params import SamplingParams

VOCAB = 49152  # the default model's


@pytest.fixture(scope="module")
def engine(default_model_dir):
    from llmctl.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from llmctl.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=ModelConfig(model=str(default_model_dir), max_model_len=128),
                                  cache=CacheConfig(kv_cache_memory=8 * 2**20),
                                  scheduler=SchedulerConfig(max_num_seqs=4)))


REFUSED = [
    ("stop_token_ids", [1, 2], dict(min_tokens=2, stop_token_ids=[10**9])),
    ("stop_token_ids", [1, 2], dict(stop_token_ids=[VOCAB])),
    ("stop_token_ids", [1, 2], dict(stop_token_ids=list(range(admission.MAX_STOP_TOKEN_IDS + 1)))),
    ("stop", [1, 2], dict(stop=[f"s{i}" for i in range(admission.MAX_STOP_STRINGS + 1)])),
    ("stop", [1, 2], dict(stop=["x" * (admission.MAX_STOP_STRING_CHARS + 1)])),
    ("logit_bias", [1, 2], dict(logit_bias={VOCAB: 1.0})),
    ("logit_bias", [1, 2], dict(logit_bias={i: 1.0 for i in range(admission.MAX_LOGIT_BIAS + 1)})),
    ("n", [1, 2], dict(n=5)),
    ("prompt", [1, VOCAB], {}),
    ("prompt", [1, True], {}),
    ("prompt", [1, 2.0], {}),
    ("prompt", [], {}),
    ("prompt", list(range(129)), {}),
]


@pytest.mark.parametrize("param, prompt, fields", REFUSED, ids=[f"{r[0]}-{i}" for i, r in enumerate(REFUSED)])
def test_engine_refuses_at_admission(engine, param, prompt, fields):
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request("r", prompt, SamplingParams(**fields))
    assert str(err.value).startswith(f"{param}:")
    assert not engine.has_unfinished_requests() and not engine.scheduler.has_unfinished_seqs()


def test_limits_are_inclusive_and_the_request_then_runs(engine):
    params = SamplingParams(temperature=0.0, max_tokens=2, n=4, stop=["x" * admission.MAX_STOP_STRING_CHARS],
                            stop_token_ids=[VOCAB - 1], logit_bias={VOCAB - 1: -100.0})
    engine.add_request("ok", list(range(1, 128)), params)
    while engine.has_unfinished_requests():
        engine.step()
    stats = engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_sampling_params_refuse_bad_logit_bias():
    for bad in ({1: 101.0}, {1: float("nan")}, {-1: 1.0}, {True: 1.0}, {"5": 1.0}, [1]):
        with pytest.raises(InvalidRequestError, match="^logit_bias:"):
            SamplingParams(logit_bias=bad)


def test_server_context_rule():
    assert admission.check_context(10, None, 128) == 118
    assert admission.check_context(10, 118, 128) == 118
    with pytest.raises(InvalidRequestError, match="^max_tokens:"):
        admission.check_context(10, 119, 128)
    with pytest.raises(InvalidRequestError, match="^prompt:"):
        admission.check_context(128, None, 128)
    with pytest.raises(InvalidRequestError, match="^prompt:"):
        admission.check_num_prompts(admission.MAX_PROMPTS_PER_REQUEST + 1)
