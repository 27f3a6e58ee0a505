"""LLMEngine behaviour on the default model: n>1 block sharing, aborts, stop strings,
prompt logprobs (chunked and prefix-cached) against transformers, seeds, errors, stats."""

from __future__ import annotations

import pytest
import torch

from llmctl.engine.llm_engine import LLMEngine
from llmctl.errors import InvalidRequestError
from llmctl.sampling_params import SamplingParams

PROMPT = list(range(1000, 1040))  # 40 tokens: two full blocks of 16 and a partial one


@pytest.fixture(scope="module")
def engine():
    return LLMEngine.from_engine_args("default", max_model_len=512, kv_cache_memory="64MiB",
                                      max_num_batched_tokens=32)


def drain(engine: LLMEngine) -> dict:
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return finished


def test_n_samples_share_the_prompt_blocks(engine):
    engine.add_request("n3", PROMPT, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6))
    seqs = engine._requests["n3"].seqs
    while not all(s.block_table for s in seqs):
        engine.step()
    full = [s.block_table[:2] for s in seqs]
    assert full[0] == full[1] == full[2]
    assert all(engine.block_manager.blocks[b].ref_count == 3 for b in full[0])
    engine.step()  # each child writes its own last-prompt-token slot: copy-on-write of the partial block
    assert len({s.block_table[2] for s in seqs}) == 3
    out = drain(engine)["n3"]
    assert [len(c.token_ids) for c in out.outputs] == [6, 6, 6]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # seeds seed+index differ


def test_greedy_n2_equals_n1(engine):
    engine.add_request("a", PROMPT, SamplingParams(temperature=0, max_tokens=8))
    engine.add_request("b", PROMPT, SamplingParams(n=2, temperature=0, max_tokens=8))
    out = drain(engine)
    assert out["b"].outputs[0].token_ids == out["b"].outputs[1].token_ids == out["a"].outputs[0].token_ids


@pytest.mark.parametrize("num_steps", [1, 4])  # mid-prefill (40 tokens in chunks of 32) and mid-decode
def test_abort_frees_everything(engine, num_steps):
    engine.add_request("x", PROMPT, SamplingParams(n=2, max_tokens=50))
    engine.add_request("y", PROMPT[:10], SamplingParams(max_tokens=3))
    for _ in range(num_steps):
        engine.step()
    engine.abort_request("x")
    assert engine.block_manager.num_free_blocks + sum(len(s.block_table) for s in engine.scheduler.running) \
        == engine.block_manager.num_blocks
    out = drain(engine)
    assert set(out) <= {"y"}
    assert not engine.has_unfinished_requests()


def test_stop_string_cuts_text_and_reports_it(engine):
    engine.add_request("free", "The capital of France is", SamplingParams(temperature=0, max_tokens=24))
    text = drain(engine)["free"].outputs[0].text
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]
    engine.add_request("stop", "The capital of France is", SamplingParams(temperature=0, max_tokens=24, stop=[stop]))
    done = drain(engine)["stop"].outputs[0]
    assert done.finish_reason == "stop" and done.stop_reason == stop
    assert done.text == text[: text.index(stop)]


def test_stop_string_ends_the_sequence_on_its_token_while_the_batch_runs_on(engine):
    """A stop string ends its sequence on the token that completes it, while the rest of the
    batch goes on stepping; no later token is kept, and its blocks come back."""
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    engine.add_request("free", "The capital of France is", free)
    full = drain(engine)["free"].outputs[0]
    stop = full.text.split()[2]
    k = next(i for i in range(1, len(full.token_ids) + 1) if stop in engine.tokenizer.decode(full.token_ids[:i]))
    engine.add_request("long", PROMPT, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    engine.add_request("stop", "The capital of France is", SamplingParams(temperature=0, max_tokens=24, stop=[stop]))
    done = drain(engine)  # checks every block came back
    out = done["stop"].outputs[0]
    assert out.finish_reason == "stop" and out.text == full.text[: full.text.index(stop)]
    assert out.token_ids == full.token_ids[:k]
    assert len(done["long"].outputs[0].token_ids) == 40


def test_seeded_sample_ignores_the_rest_of_the_batch(engine):
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=1234, max_tokens=10)
    engine.add_request("alone", PROMPT, params)
    alone = drain(engine)["alone"].outputs[0].token_ids
    for i in range(3):
        engine.add_request(f"other{i}", PROMPT[i:], SamplingParams(temperature=1.0, max_tokens=12))
    engine.add_request("crowd", PROMPT, params)
    assert drain(engine)["crowd"].outputs[0].token_ids == alone


@torch.inference_mode()
def test_prompt_logprobs_chunked_and_after_a_cached_prompt_match_a_dense_forward(engine, default_model_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    prompt = PROMPT + list(range(2000, 2030))  # 70 tokens: three chunks of at most 32
    ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    engine.add_request("first", prompt, params)
    first = drain(engine)["first"]
    engine.add_request("cached", prompt, params)  # the cache holds its first 64 tokens: it runs them anyway
    cached = drain(engine)["cached"]
    assert cached.num_cached_tokens == 0  # prompt logprobs need every position's logits (as vLLM)
    engine.add_request("plain", prompt, SamplingParams(temperature=0, max_tokens=1))
    assert drain(engine)["plain"].num_cached_tokens == 64
    for out in (first, cached):
        lps = out.prompt_logprobs
        assert len(lps) == len(prompt) and lps[0] is None
        for pos in range(1, len(prompt)):
            entry = lps[pos]
            assert prompt[pos] in entry and len(entry) <= 4
            assert entry[prompt[pos]] == pytest.approx(ref[pos - 1, prompt[pos]].item(), abs=1e-4)
            top = ref[pos - 1].topk(3)
            for tok, lp in zip(top.indices.tolist(), top.values.tolist()):
                assert entry.get(tok, lp) == pytest.approx(lp, abs=1e-4)


def test_logprobs_and_cumulative_logprob(engine):
    engine.add_request("lp", PROMPT, SamplingParams(temperature=0, max_tokens=5, logprobs=2))
    out = drain(engine)["lp"].outputs[0]
    assert len(out.logprobs) == 5
    for token, entry in zip(out.token_ids, out.logprobs):
        assert next(iter(entry)) == token and max(entry.values()) == entry[token]  # greedy: chosen is the top
    assert out.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(out.token_ids, out.logprobs)))


def test_bad_requests_are_clear_errors(engine):
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.add_request("bad", [1, 2, 10**6], SamplingParams())
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        engine.add_request("long", list(range(600)), SamplingParams())
    engine.add_request("dup", [1, 2, 3], SamplingParams(max_tokens=1))
    with pytest.raises(InvalidRequestError, match="already"):
        engine.add_request("dup", [1, 2, 3], SamplingParams(max_tokens=1))
    drain(engine)
    assert not engine.has_unfinished_requests()


def test_stats_and_timings(engine):
    before = engine.get_stats()
    engine.add_request("s", PROMPT[:20], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    out = drain(engine)["s"]
    after = engine.get_stats()
    assert after.num_generation_tokens - before.num_generation_tokens == 4
    assert 0 < after.num_prompt_tokens - before.num_prompt_tokens <= 20
    assert after.num_running == after.num_waiting == 0 and after.kv_cache_usage == 0.0
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
    assert out.outputs[0].finish_reason == "length"


def test_prompt_logprobs_survive_preemption_and_cache_hits(engine):
    small = LLMEngine.from_engine_args("default", max_model_len=128, num_gpu_blocks_override=12,
                                       max_num_batched_tokens=32)
    prompts = {f"p{i}": PROMPT[i:] + list(range(3000 + 30 * i, 3020 + 30 * i)) for i in range(3)}
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, prompt_logprobs=1)
    for rid, prompt in prompts.items():
        small.add_request(rid, prompt, params)
    squeezed = drain(small)
    assert small.get_stats().num_preemptions > 0
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, params)
    reference = drain(engine)
    for rid, prompt in prompts.items():
        got, want = squeezed[rid].prompt_logprobs, reference[rid].prompt_logprobs
        assert len(got) == len(want) == len(prompt)
        for a, b in zip(got[1:], want[1:]):
            assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-4 for t in a)


def test_final_only_requests_get_one_output_the_same_as_the_last_cumulative_one(engine):
    from llmctl.sampling_params import RequestOutputKind

    params = dict(temperature=0.0, max_tokens=5, ignore_eos=True)
    engine.add_request("cum", PROMPT, SamplingParams(**params))
    engine.add_request("fin", PROMPT, SamplingParams(**params, output_kind=RequestOutputKind.FINAL_ONLY))
    seen: dict[str, list] = {"cum": [], "fin": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert len(seen["cum"]) == 5 and [len(o.outputs[0].token_ids) for o in seen["cum"]] == [1, 2, 3, 4, 5]
    assert len(seen["fin"]) == 1 and seen["fin"][0].finished
    cum, fin = seen["cum"][-1].outputs[0], seen["fin"][0].outputs[0]
    assert (fin.token_ids, fin.text, fin.finish_reason) == (cum.token_ids, cum.text, cum.finish_reason)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
