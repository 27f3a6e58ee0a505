"""The real server (uvicorn on a free loopback port, the default model) against hostile and
careless requests: refusals before any work or stream byte, chat templating a client cannot
rewrite, errors that leak nothing, honoured or refused fields, metrics that forget aborts."""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import os
import random
import socket
import time

import httpx
import pytest
from servers import free_port, running_app

MAX_MODEL_LEN = 256
MAX_NUM_SEQS = 4
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
GUARD = "conversations must start with a user or system message"
BODY_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    """Served with the operator's chat template: the model's own, behind a guard that refuses
    a conversation opening with the assistant (as templates that check roles do)."""
    from llmctl.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, ServeConfig
    from llmctl.engine.llm_engine import LLMEngine
    from llmctl.serve.launcher import build_app

    engine = LLMEngine(EngineConfig(model=ModelConfig(model=str(default_model_dir), max_model_len=MAX_MODEL_LEN),
                                    cache=CacheConfig(kv_cache_memory=32 * 2**20),
                                    scheduler=SchedulerConfig(max_num_seqs=MAX_NUM_SEQS, max_waiting=8)))
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('" + GUARD + "') }}{% endif %}"
                        + engine.tokenizer.chat_template)
    config = ServeConfig(port=free_port(), chat_template=str(template), request_body_timeout_s=BODY_TIMEOUT_S)
    app = build_app(engine, config)
    with running_app(app, config.host, config.port):
        yield {"url": f"http://127.0.0.1:{config.port}", "engine": engine, "app": app}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server["url"], timeout=120) as c:
        yield c


def _metrics(http) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("llmctl:") and "_bucket" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _gauge(m: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in m.items() if k.startswith(prefix))


def _error(res: httpx.Response, status: int) -> dict:
    assert res.status_code == status, res.text
    assert res.headers["content-type"] == "application/json"
    err = res.json()["error"]
    assert err["code"] == status and err["message"]
    return err


def test_kv_gauges_are_set_before_the_first_request(http, server):
    m = _metrics(http)
    total = server["engine"].get_stats().num_total_blocks
    assert total > 0
    assert _gauge(m, "llmctl:kv_cache_total_blocks") == total == _gauge(m, "llmctl:kv_cache_free_blocks")


# --- item 1: admission ------------------------------------------------------------------

def test_out_of_vocabulary_stop_id_is_400_and_the_next_request_succeeds(http):
    err = _error(http.post("/v1/completions", json={"prompt": "Hi", "min_tokens": 2,
                                                    "stop_token_ids": [1000000000]}), 400)
    assert err["param"] == "stop_token_ids" and err["type"] == "invalid_request_error"
    assert http.get("/health").status_code == 200
    ok = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "min_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize("body, param", [
    ({"prompt": "Hi", "stop": [f"s{i}" for i in range(200_000)]}, "stop"),
    ({"prompt": "Hi", "stop": ["x" * 5000]}, "stop"),
    ({"prompt": [1, True, 3]}, "prompt"),
    ({"prompt": "Hi", "stop_token_ids": [True]}, "stop_token_ids"),
    ({"prompt": "Hi", "logit_bias": {"49152": 5}}, "logit_bias"),
    ({"prompt": "Hi", "logit_bias": {"x": 5}}, "logit_bias"),
    ({"prompt": "Hi", "logit_bias": {"5": 500}}, "logit_bias"),
    ({"prompt": ["Hi"] * 300}, "prompt"),
    ({"prompt": "Hi", "n": 1_000_000}, "n"),
])
def test_sizes_and_ids_are_refused_before_any_work(http, body, param):
    for stream in (False, True):
        assert _error(http.post("/v1/completions", json={**body, "stream": stream}), 400)["param"].startswith(param)


def test_streaming_chat_with_huge_n_is_400_before_a_byte(http):
    res = http.post("/v1/chat/completions", json={"messages": CHAT, "n": 100_000, "stream": True})
    assert _error(res, 400)["param"] == "n" and len(res.content) < 1000


# --- item 3: chat templating -------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{"chat_template": "{{ 'x' * 1000000 }}"}, {"tokenize": True},
                                    {"conversation": []}, {"return_dict": True}, {"enable_thinking": {"a": 1}}])
def test_chat_template_kwargs_outside_the_allow_list_are_refused(http, kwargs):
    res = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "chat_template_kwargs": kwargs})
    err = _error(res, 400)
    assert err["param"] == "chat_template_kwargs" and "Traceback" not in err["message"]
    assert res.headers.get("connection") != "close"


def test_allowed_kwargs_and_the_operators_template_apply(http, server):
    res = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "temperature": 0,
                                                  "chat_template_kwargs": {"enable_thinking": False,
                                                                           "add_generation_prompt": True}})
    assert res.status_code == 200, res.text
    tok = http.post("/tokenize", json={"messages": CHAT}).json()
    tokenizer = server["engine"].tokenizer
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert tok["tokens"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    opened_by_assistant = [{"role": "assistant", "content": "Hello"}, *CHAT]
    for path in ("/v1/chat/completions", "/tokenize"):
        err = _error(http.post(path, json={"messages": opened_by_assistant, "max_tokens": 2}), 400)
        assert GUARD in err["message"] and err["param"] == "messages"


def test_lone_surrogates_are_400_and_keep_the_connection(http):
    raw = b'{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}'
    headers = {"content-type": "application/json"}
    for path, body in (("/v1/chat/completions", raw), ("/v1/completions", b'{"prompt": "a\\udfffb"}'),
                       ("/tokenize", b'{"prompt": "\\ud800"}')):
        res = http.post(path, content=body, headers=headers)
        assert "surrogate" in _error(res, 400)["message"]
        assert res.headers.get("connection") != "close"
    assert http.get("/health").status_code == 200


# --- item 4: errors ----------------------------------------------------------------------

def test_internal_errors_say_only_a_request_id_and_the_log_has_the_traceback(http, server, caplog, monkeypatch):
    ctx = server["app"].state.ctx

    def broken(*args, **kwargs):
        raise RuntimeError("secret detail of the engine internals")

    monkeypatch.setattr(ctx.engine, "generate", broken)
    caplog.set_level(logging.ERROR, logger="llmctl.serve")
    res = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers={"x-request-id": "abc-123"})
    err = _error(res, 500)
    assert err["type"] == "server_error" and "abc-123" in err["message"] and res.headers["x-request-id"] == "abc-123"
    assert "secret" not in res.text and "RuntimeError" not in res.text
    logged = [r for r in caplog.records if "abc-123" in r.getMessage()]
    assert logged and logged[0].exc_info and "secret detail" in str(logged[0].exc_info[1])


@pytest.mark.parametrize("method, path, status, kind", [
    ("GET", "/v1/completions", 405, "invalid_request_error"),
    ("POST", "/v1/nothing", 404, "not_found_error"),
    ("POST", "/v1/completions", 400, "invalid_request_error"),
])
def test_openai_type_strings_and_allow_header(http, method, path, status, kind):
    res = http.request(method, path, json={"prompt": "x", "temperature": -1})
    assert _error(res, status)["type"] == kind
    if status == 405:
        assert res.headers["allow"] == "POST"


def test_a_half_sent_body_times_out_with_408(server, http):
    port = int(server["url"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\": \"Hi")
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply
    assert json.loads(body)["error"]["code"] == 408
    assert http.get("/health").status_code == 200


def test_unknown_model_is_404(http):
    err = _error(http.post("/v1/completions", json={"prompt": "x", "model": "gpt-4"}), 404)
    assert err["type"] == "not_found_error" and err["param"] == "model"


def test_openapi_documents_the_error_bodies_and_the_limits(http):
    schema = http.get("/openapi.json").json()
    schemas = schema["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ErrorResponse" in schemas
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        responses = schema["paths"][path]["post"]["responses"]
        assert "422" not in responses
        for code in ("400", "401", "404", "413", "503"):
            assert responses[code]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    completion = schemas["CompletionRequest"]["properties"]
    assert completion["n"]["maximum"] == MAX_NUM_SEQS and completion["n"]["minimum"] == 1
    assert any(b.get("maximum") == MAX_MODEL_LEN - 1 for b in completion["max_tokens"]["anyOf"])
    assert any(b.get("maxItems") == 64 for b in completion["stop"]["anyOf"])
    assert any(b.get("maxLength") == 1024 for b in completion["stop"]["anyOf"])
    assert schemas["ChatCompletionRequest"]["properties"]["top_logprobs"]["anyOf"][0]["maximum"] == 20
    assert "content" not in schema["paths"]["/health"]["get"]["responses"]["200"]
    assert list(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]


# --- item 7: logit_bias, tools, response_format ---------------------------------------------

def test_logit_bias_is_applied(http, server):
    tokenizer = server["engine"].tokenizer
    target = tokenizer.encode(" banana", add_special_tokens=False)[0]
    body = {"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0, "logprobs": 1}
    plain = http.post("/v1/completions", json=body).json()["choices"][0]
    biased = http.post("/v1/completions", json={**body, "logit_bias": {str(target): 100}}).json()["choices"][0]
    assert tokenizer.decode([target]) not in plain["text"]
    assert biased["text"] == tokenizer.decode([target] * 3)
    # logprobs are the model's own, before the bias
    assert biased["logprobs"]["token_logprobs"][0] < plain["logprobs"]["token_logprobs"][0]


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
])
def test_unsupported_fields_are_refused_not_ignored(http, extra, param):
    res = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, **extra})
    assert _error(res, 400)["param"] == param


def test_trivially_supported_forms_are_served(http):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    for extra in ({"tools": tools, "tool_choice": "none"}, {"response_format": {"type": "text"}}):
        res = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, **extra})
        assert res.status_code == 200, res.text


# --- item 9: metrics of aborted requests ----------------------------------------------------

def _aborted_stream(url: str) -> None:
    body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=url, timeout=120) as c, c.stream("POST", "/v1/completions", json=body) as res:
        assert res.status_code == 200
        first = next(res.iter_lines())
        assert first.startswith("data: ") and json.loads(first[6:])["choices"]


def test_100_aborted_streams_leave_no_state_and_count_100_aborts(http, server):
    metrics = server["app"].state.metrics
    key = 'llmctl:request_success_total{finished_reason="abort",model_name="%s"}' % metrics.model_name
    before = _metrics(http).get(key, 0.0)
    with concurrent.futures.ThreadPoolExecutor(MAX_NUM_SEQS) as pool:
        list(pool.map(lambda _: _aborted_stream(server["url"]), range(100)))
    deadline = time.time() + 60
    while True:
        m = _metrics(http)
        idle = _gauge(m, "llmctl:num_requests_running") == 0 and _gauge(m, "llmctl:num_requests_waiting") == 0
        if idle and m.get(key, 0.0) - before == 100:
            break
        assert time.time() < deadline, (m.get(key), before)
        time.sleep(0.2)
    assert metrics.num_tracked_requests == 0
    assert _gauge(m, "llmctl:kv_cache_free_blocks") == _gauge(m, "llmctl:kv_cache_total_blocks")


# --- fuzz: hypothesis over the request models ----------------------------------------------

FUZZ_SEED = int(os.environ.get("LLMCTL_FUZZ_SEED", random.randrange(2**32)))
DOCUMENTED = {400, 401, 404, 408, 413}


def _json_values():
    from hypothesis import strategies as st

    scalars = (st.none() | st.booleans() | st.integers(-3, 8) | st.sampled_from([2**31, 2**64, -(2**63), 49152, 10**9])
               | st.floats(-3, 3, allow_nan=False) | st.sampled_from([1e300, -1e-300, 101.0])
               | st.text(max_size=12) | st.sampled_from(["", "\n", "<|im_end|>", "a" * 2000]))
    return st.recursive(scalars, lambda inner: st.lists(inner, min_size=1, max_size=4)
                        | st.dictionaries(st.text(max_size=6) | st.sampled_from(["5", "49151", "-1"]), inner,
                                          min_size=1, max_size=3), max_leaves=8)


def _plausible_fields():
    """Values the server should mostly accept, so the fuzz reaches the engine, not only validation."""
    from hypothesis import strategies as st

    return {"temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1), "top_k": st.integers(-1, 50),
            "min_p": st.floats(0, 1), "presence_penalty": st.floats(-2, 2), "repetition_penalty": st.floats(0.5, 2),
            "seed": st.integers(0, 2**63), "n": st.integers(1, 3), "max_tokens": st.integers(1, 4),
            "min_tokens": st.integers(0, 2), "stream": st.booleans(),
            "stop": st.lists(st.text(min_size=1, max_size=4), max_size=3), "ignore_eos": st.booleans(),
            "stop_token_ids": st.lists(st.integers(0, 49151), max_size=3), "echo": st.booleans(),
            "logit_bias": st.dictionaries(st.integers(0, 49151).map(str), st.floats(-100, 100), max_size=2),
            "include_stop_str_in_output": st.booleans(), "skip_special_tokens": st.booleans(),
            "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})}


def _bodies(model, required: dict, plausible: bool):
    """Request bodies over the pydantic model's fields: plausible values, or any JSON in any
    field; `required` fields drawn from their own strategies; small token budgets keep it quick."""
    from hypothesis import strategies as st

    if plausible:
        fields = {k: v for k, v in _plausible_fields().items() if k in model.model_fields}
    else:
        any_json = _json_values()
        fields = {name: any_json for name in model.model_fields}
        fields.update({k: v | any_json for k, v in _plausible_fields().items() if k in model.model_fields})
    # Always a small token budget: without one a chat request would generate up to the context.
    budget = st.integers(1, 4) if plausible else st.integers(-1, 6) | st.sampled_from([2**31, "4", 1.5, True, []])
    required = {**required, **{k: budget for k in ("max_tokens",) if k in model.model_fields}}
    optional = {k: v for k, v in fields.items() if k not in required}
    return st.fixed_dictionaries(required, optional=optional)


def _check_answer(res: httpx.Response, response_model) -> None:
    from llmctl.serve.protocol import ErrorResponse

    assert res.status_code < 500, res.text
    if res.status_code != 200:
        assert res.status_code in DOCUMENTED, res.text
        ErrorResponse.model_validate(res.json())
        return
    if res.headers["content-type"].startswith("text/event-stream"):
        lines = [line for line in res.text.splitlines() if line]
        assert lines[-1] == "data: [DONE]"
        for line in lines[:-1]:
            event = json.loads(line[len("data: "):])
            assert "error" not in event or event["error"]["code"] < 500, event
        return
    response_model.model_validate(res.json())


def test_fuzz_requests_never_get_a_5xx_and_the_server_lives(http, server):
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st

    from llmctl.serve.protocol import (
        ChatCompletionRequest,
        ChatCompletionResponse,
        CompletionRequest,
        CompletionResponse,
        DetokenizeRequest,
        DetokenizeResponse,
        TokenizeRequest,
        TokenizeResponse,
    )

    print(f"fuzz seed: {FUZZ_SEED} (LLMCTL_FUZZ_SEED={FUZZ_SEED} reproduces it)")
    good_messages = st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": st.text(max_size=20)}),
                             min_size=1, max_size=2)
    messages = good_messages | st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", ""])},
        optional={"content": st.text(max_size=20) | _json_values()}), max_size=3) | _json_values()
    good_prompts = st.text(min_size=1, max_size=30) | st.lists(st.integers(0, 49151), min_size=1, max_size=6)
    prompts = good_prompts | st.lists(st.integers(-1, 49152), max_size=6) | st.lists(st.text(max_size=8), max_size=3) \
        | _json_values()
    cases = st.one_of(*[
        st.one_of(
            st.tuples(st.just("/v1/completions"), _bodies(CompletionRequest, {"prompt": good_prompts if ok else prompts},
                                                           ok), st.just(CompletionResponse)),
            st.tuples(st.just("/v1/chat/completions"), _bodies(
                ChatCompletionRequest, {"messages": good_messages if ok else messages}, ok), st.just(ChatCompletionResponse)),
            st.tuples(st.just("/tokenize"), _bodies(TokenizeRequest, {"prompt": good_prompts} if ok else {}, ok),
                      st.just(TokenizeResponse)),
            st.tuples(st.just("/detokenize"), _bodies(DetokenizeRequest, {"tokens": good_prompts if ok else prompts}, ok),
                      st.just(DetokenizeResponse)))
        for ok in (True, False)])

    statuses: collections.Counter = collections.Counter()

    @seed(FUZZ_SEED)
    @settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(cases)
    def run(case):
        path, body, response_model = case
        res = http.post(path, json=body)
        statuses[path, res.status_code] += 1
        _check_answer(res, response_model)

    run()
    print(f"fuzz answers (path, status): {dict(statuses)}")
    assert http.get("/health").status_code == 200
    deadline = time.time() + 60
    while True:
        m = _metrics(http)
        if (_gauge(m, "llmctl:num_requests_running") == 0 and _gauge(m, "llmctl:num_requests_waiting") == 0
                and _gauge(m, "llmctl:kv_cache_free_blocks") == _gauge(m, "llmctl:kv_cache_total_blocks")):
            break
        assert time.time() < deadline, m
        time.sleep(0.2)
    assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
