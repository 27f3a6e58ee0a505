"""The offline API: `LLM(...).generate` on the default model."""

from __future__ import annotations

import pytest

from llmctl.errors import CacheCapacityError, ConfigError, InvalidRequestError


@pytest.fixture(scope="module")
def llm_and_events():
    from llmctl.llm import LLM

    events = []
    llm = LLM("default", max_model_len=256, kv_cache_memory="32MiB",
              progress=lambda event, info: events.append((event, info)))
    return llm, events


def test_generate_returns_outputs_in_input_order(llm_and_events):
    from llmctl.sampling_params import SamplingParams

    llm, _ = llm_and_events
    prompts = ["Once upon a time", [1, 504, 3458, 282], "Water boils at"]
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (3, 5, 7)]
    outs = llm.generate(prompts, params)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 5, 7]
    assert outs[0].prompt == "Once upon a time" and outs[1].prompt is None
    assert outs[0].prompt_token_ids == llm.tokenizer.encode("Once upon a time")
    assert outs[2].outputs[0].text == llm.tokenizer.decode(outs[2].outputs[0].token_ids, skip_special_tokens=True)
    single = llm.generate("Water boils at", SamplingParams(temperature=0, max_tokens=7))
    assert single[0].outputs[0].token_ids == outs[2].outputs[0].token_ids
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_engine_reports_its_kv_plan_through_the_callback(llm_and_events):
    llm, events = llm_and_events
    plans = [info for event, info in events if event == "kv_plan"]
    assert len(plans) == 1
    plan = plans[0]["plan"]
    assert plan.kv_bytes_per_token == 2 * 30 * 3 * 64 * 4  # fp32 on the CPU
    assert plan.num_blocks == (32 << 20) // (16 * plan.kv_bytes_per_token) == llm.engine.block_manager.num_blocks
    assert "KV blocks" in plans[0]["message"]


def test_bad_arguments():
    from llmctl.llm import LLM
    from llmctl.sampling_params import SamplingParams

    with pytest.raises(ConfigError, match="no_such_arg"):
        LLM("default", no_such_arg=1)
    with pytest.raises(CacheCapacityError, match="max_model_len=8,192") as err:
        LLM("default", max_model_len=8192, kv_cache_memory="16MiB")
    assert "--max-model-len to 352" in err.value.hint
    llm = LLM("default", max_model_len=64, kv_cache_memory="8MiB")
    with pytest.raises(InvalidRequestError):
        llm.generate(["a", "b"], [SamplingParams()])
