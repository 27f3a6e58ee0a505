"""The real server (uvicorn on a free loopback port, the default model, llmctl's engine)
spoken to with the official `openai` client and raw HTTP. One server for the module."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from servers import free_port, running_app

API_KEY = "test-key"
MAX_MODEL_LEN = 512
MAX_NUM_SEQS = 4
MAX_WAITING = 2
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at", "Once upon a time"]


def _engine_config(model_dir, **cache):
    from llmctl.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

    return EngineConfig(model=ModelConfig(model=str(model_dir), max_model_len=MAX_MODEL_LEN),
                        cache=CacheConfig(kv_cache_memory=64 * 2**20, **cache),
                        scheduler=SchedulerConfig(max_num_seqs=MAX_NUM_SEQS, max_waiting=MAX_WAITING))


@pytest.fixture(scope="module")
def offline(default_model_dir):
    """The offline API on the same model: what greedy server answers must equal."""
    from llmctl.llm import LLM

    return LLM.from_engine_config(_engine_config(default_model_dir))


@pytest.fixture(scope="module")
def server(default_model_dir):
    from llmctl.config import ServeConfig
    from llmctl.engine.llm_engine import LLMEngine
    from llmctl.serve.launcher import build_app

    # Loaded as "default", as `llmctl serve` with no model does: the server also answers to that name.
    engine = LLMEngine(_engine_config("default"))
    config = ServeConfig(port=free_port(), api_key=API_KEY, max_request_bytes=64 * 1024)
    app = build_app(engine, config)
    with running_app(app, config.host, config.port):
        yield {"url": f"http://127.0.0.1:{config.port}", "model": app.state.ctx.model_name, "engine": engine}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server["url"], headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


def _greedy(**kw):
    from llmctl.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, **kw)


def _metrics(http) -> dict[str, float]:
    out = {}
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("llmctl:") and "_bucket" not in line:
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = out.get(name.split("{")[0], 0.0) + float(value)
    return out


def _wait_idle(http, timeout: float = 60.0) -> dict[str, float]:
    deadline = time.time() + timeout
    while True:
        m = _metrics(http)
        idle = m["llmctl:num_requests_running"] == 0 and m["llmctl:num_requests_waiting"] == 0
        if idle and m["llmctl:kv_cache_free_blocks"] == m["llmctl:kv_cache_total_blocks"]:
            return m
        assert time.time() < deadline, f"server not idle: {m}"
        time.sleep(0.2)


# --- endpoints ---------------------------------------------------------------------

def test_models_health_version_tokenize(client, http, server):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == server["model"] and set(ids) <= {server["model"], str(server["engine"].config.model.model)}
    assert http.get("/health").status_code == 200
    assert http.get("/version").json()["version"]
    tok = http.post("/tokenize", json={"prompt": PROMPTS[0]}).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == MAX_MODEL_LEN
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == PROMPTS[0]


def test_greedy_completions_equal_offline_engine(client, offline, server):
    res = client.completions.create(model=server["model"], prompt=PROMPTS, max_tokens=12, temperature=0)
    ref = offline.generate(PROMPTS, _greedy(max_tokens=12))
    assert [c.index for c in res.choices] == list(range(len(PROMPTS)))
    assert [c.text for c in res.choices] == [r.outputs[0].text for r in ref]
    assert res.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in ref)
    assert res.usage.completion_tokens == sum(len(r.outputs[0].token_ids) for r in ref)


def test_greedy_chat_equals_offline_engine(client, offline, server):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    res = client.chat.completions.create(model=server["model"], messages=messages, max_tokens=12, temperature=0)
    ids = offline.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ref = offline.generate([offline.tokenizer(ids, add_special_tokens=False)["input_ids"]], _greedy(max_tokens=12))[0]
    assert res.choices[0].message.role == "assistant"
    assert res.choices[0].message.content == ref.outputs[0].text
    assert res.usage.prompt_tokens == len(ref.prompt_token_ids)


def test_streaming_completion_matches_non_streaming(client, server):
    kw = dict(model=server["model"], prompt=PROMPTS[:2], max_tokens=10, temperature=0)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    texts, finish = {0: "", 1: ""}, {}
    for chunk in chunks[:-1]:
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert texts == {c.index: c.text for c in full.choices}
    assert finish == {0: "length", 1: "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_streaming_chat(client, server):
    kw = dict(model=server["model"], messages=[{"role": "user", "content": "Say hello."}], max_tokens=10, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [full.choices[0].finish_reason]
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_n3_and_seed_reproducibility(client, server):
    kw = dict(model=server["model"], prompt="Once upon a time", max_tokens=8, temperature=1.0, n=3, seed=1234)
    first, second = client.completions.create(**kw), client.completions.create(**kw)
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len({c.text for c in first.choices}) > 1  # three samples, not one thrice
    chat = client.chat.completions.create(model=server["model"], messages=[{"role": "user", "content": "Tell a joke"}],
                                          max_tokens=6, n=3, seed=5)
    assert sorted(c.index for c in chat.choices) == [0, 1, 2]


def test_stop_string(client, offline, server):
    ref = offline.generate([PROMPTS[3]], _greedy(max_tokens=16))[0].outputs[0].text
    stop = ref.strip().split()[2]  # a word from the middle of the greedy continuation
    res = client.completions.create(model=server["model"], prompt=PROMPTS[3], max_tokens=16, temperature=0, stop=[stop])
    choice = res.choices[0]
    assert choice.text == ref[:ref.index(stop)]
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == stop


def test_completion_logprobs(client, server):
    res = client.completions.create(model=server["model"], prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=2)
    lp = res.choices[0].logprobs
    assert "".join(lp.tokens) == res.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for tok, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and logprob <= 0
        assert logprob == pytest.approx(max(top.values()))  # greedy: the chosen token is the top one
        assert top[tok] == logprob
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]


def test_echo_logprobs_cover_the_prompt(http, offline, server):
    """What lm-eval's local-completions sends: token-id prompts, echo, max_tokens 1, logprobs 1."""
    ids = [offline.tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    body = {"model": server["model"], "prompt": ids, "echo": True, "max_tokens": 1, "logprobs": 1, "temperature": 0}
    res = http.post("/v1/completions", json=body).json()
    ref = offline.generate(ids, _greedy(max_tokens=1, prompt_logprobs=1, logprobs=1))
    for choice, prompt_ids, r in zip(sorted(res["choices"], key=lambda c: c["index"]), ids, ref):
        lp = choice["logprobs"]
        assert choice["text"] == PROMPTS[choice["index"]] + r.outputs[0].text
        assert len(lp["tokens"]) == len(prompt_ids) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        expected = [r.prompt_logprobs[i][t] for i, t in enumerate(prompt_ids) if i > 0]
        assert lp["token_logprobs"][1:len(prompt_ids)] == pytest.approx(expected, abs=1e-4)
        assert lp["token_logprobs"][-1] == pytest.approx(r.outputs[0].logprobs[0][r.outputs[0].token_ids[0]], abs=1e-4)


def test_chat_logprobs_shape(client, server):
    res = client.chat.completions.create(model=server["model"], messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = res.choices[0].logprobs.content
    assert "".join(c.token for c in content) == res.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 3
        assert [t.logprob for t in c.top_logprobs] == sorted((t.logprob for t in c.top_logprobs), reverse=True)
        assert c.top_logprobs[0].token == c.token and c.top_logprobs[0].logprob == pytest.approx(c.logprob)
        assert bytes(c.bytes).decode("utf-8", "replace") == c.token


def test_metrics_are_named_like_vllms(http):
    m = _wait_idle(http)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_preemptions_total",
                 "prefix_cache_queries_total", "prefix_cache_hits_total"):
        assert f"llmctl:{name}" in m
    for name in ("prompt_tokens_total", "generation_tokens_total", "time_to_first_token_seconds_count",
                 "inter_token_latency_seconds_count", "e2e_request_latency_seconds_count",
                 "request_queue_time_seconds_count", "request_prefill_time_seconds_count",
                 "request_decode_time_seconds_count", "request_prompt_tokens_count",
                 "request_generation_tokens_count"):
        assert m[f"llmctl:{name}"] > 0, name


# --- errors ------------------------------------------------------------------------

def _post(http, path: str, body, status: int, **kw) -> dict:
    raw = isinstance(body, (bytes, Iterator))
    res = http.post(path, content=body, **kw) if raw else http.post(path, json=body, **kw)
    assert res.status_code == status, res.text
    err = res.json()["error"]
    assert err["code"] == status and err["type"] and err["message"]
    return err


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": "hello " * MAX_MODEL_LEN}, "prompt"),
    ({"prompt": "x", "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    ({"prompt": [[10**9]]}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
])
def test_completion_errors_are_400(http, body, param):
    assert _post(http, "/v1/completions", body, 400)["param"] == param


def test_chat_errors_are_400(http):
    assert _post(http, "/v1/chat/completions", {"messages": []}, 400)["param"] == "messages"
    assert _post(http, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
                 400)["param"] == "top_logprobs"


UNKNOWN_MODEL_BODIES = [
    ("/v1/completions", {"prompt": "x", "max_tokens": 4}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4}),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path, body", UNKNOWN_MODEL_BODIES)
def test_unknown_model_is_404_before_any_stream(http, server, path, body, stream):
    res = http.post(path, json={**body, "model": "no-such-model", "stream": stream})
    assert res.status_code == 404 and res.headers["content-type"] == "application/json", res.text
    body = res.json()
    assert body["object"] == "error" and set(body["error"]) == {"message", "type", "param", "code"}
    err = body["error"]
    assert (err["type"], err["param"], err["code"]) == ("not_found_error", "model", 404)
    assert "`no-such-model` does not exist" in err["message"] and server["model"] in err["message"]


@pytest.mark.parametrize("path, body", UNKNOWN_MODEL_BODIES)
def test_openai_client_raises_not_found_for_unknown_model(client, path, body):
    create = client.completions.create if path == "/v1/completions" else client.chat.completions.create
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as err:
            create(model="no-such-model", stream=stream, **body)
        assert err.value.status_code == 404 and err.value.body["param"] == "model"


@pytest.mark.parametrize("path, body", UNKNOWN_MODEL_BODIES)
def test_every_listed_name_and_a_missing_model_are_served(http, server, path, body):
    """Each name in /v1/models ("default" among them) answers under that name; no model
    (OpenAI requires one, vLLM does not) is the served model."""
    names = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert "default" in names
    for model in [*names, None]:
        request = {**body, "max_tokens": 1} if model is None else {**body, "model": model, "max_tokens": 1}
        res = http.post(path, json=request)
        assert res.status_code == 200, res.text
        assert res.json()["model"] == (model or server["model"])


def test_openai_client_raises_typed_errors(client, server):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=server["model"], prompt="x", temperature=-2)
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_auth_404_413(server, http):
    no_key = httpx.post(server["url"] + "/v1/completions", json={"prompt": "x"})
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == 401
    assert httpx.get(server["url"] + "/health").status_code == 200  # probes need no key
    _post(http, "/v1/nothing-here", {"prompt": "x"}, 404)
    _post(http, "/v1/completions", {"prompt": "x" * 70_000}, 413)
    chunked = iter([b'{"prompt": "', b"y" * 70_000, b'"}'])
    _post(http, "/v1/completions", chunked, 413, headers={"content-type": "application/json"})


def test_queue_limit_503_then_disconnects_free_every_block(server, http):
    """Hold max_num_seqs + max_waiting streams open: the next request gets 503. Then drop
    them all mid-stream (and one non-streaming request by timeout): the server goes idle
    with every KV block free."""
    limit = MAX_NUM_SEQS + MAX_WAITING
    body = {"model": server["model"], "prompt": "Count: 1, 2, 3,", "max_tokens": 400, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=server["url"], headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        streams = [c.stream("POST", "/v1/completions", json=body) for _ in range(limit)]
        responses = [s.__enter__() for s in streams]
        assert all(r.status_code == 200 for r in responses)
        lines = responses[0].iter_lines()  # dropping this iterator would close the stream
        first = next(lines)
        assert first.startswith("data: ") and json.loads(first[6:])["choices"]
        err = _post(http, "/v1/completions", {**body, "stream": False}, 503)
        assert "limit" in err["message"]
        for s in streams:
            s.__exit__(None, None, None)
    _wait_idle(http)
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json={**body, "stream": False}, timeout=1.0)
    m = _wait_idle(http)
    assert m["llmctl:kv_cache_free_blocks"] == server["engine"].get_stats().num_total_blocks
    assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_bench_serve_client_against_the_server(server, http):
    """`llmctl bench serve`'s client: every request either completes with its tokens or,
    when told to hang up, disconnects; nothing fails and nothing is left running."""
    from llmctl.bench.serve_client import ServeBenchConfig, benchmark

    cfg = ServeBenchConfig(base_url=server["url"], api_key=API_KEY, num_prompts=6, input_len=24, output_len=8,
                           max_concurrency=3, disconnect_fraction=0.5, seed=3, goodput={"e2el": 600_000})
    s = benchmark(cfg)
    assert s["failed"] == 0 and s["status_5xx"] == 0, s["errors"]
    assert s["completed"] + s["disconnected"] == 6 and s["disconnected"] >= 1
    assert s["total_output_tokens"] == 8 * s["completed"]
    assert 0 < s["median_ttft_ms"] <= s["median_e2el_ms"] and s["request_goodput"] == pytest.approx(s["request_throughput"])
    _wait_idle(http)
