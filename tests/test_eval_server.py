"""`--base-url`: eval through a real `llmctl serve` (uvicorn on a free loopback port) picks the
same cloze and multiple-choice answers, with the same numbers, as the in-process engine on
the same weights; a server without prompt logprobs is one clear error."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from servers import free_port, running_app

from llmctl.config import EvalConfig

MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def server(default_model_dir):

    from llmctl.config import CacheConfig, EngineConfig, ModelConfig, ServeConfig
    from llmctl.engine.llm_engine import LLMEngine
    from llmctl.serve.launcher import build_app

    engine = LLMEngine(EngineConfig(model=ModelConfig(model="default", device="cpu", dtype="float32",
                                                      max_model_len=MAX_MODEL_LEN),
                                    cache=CacheConfig(kv_cache_memory=256 * 2**20)))
    config = ServeConfig(port=free_port())
    app = build_app(engine, config)
    with running_app(app, config.host, config.port):
        yield f"http://127.0.0.1:{config.port}"


@pytest.fixture(scope="module")
def mc_task(tmp_path_factory):
    """Eight MMLU questions as a local JSONL task (every 1,700th of the file)."""
    from llmctl.eval.multiple_choice import mmlu_rows

    rows = [r for subject in mmlu_rows().values() for r in subject][::1700][:8]
    path = tmp_path_factory.mktemp("task") / "mmlu8.jsonl"
    path.write_text("".join(json.dumps({"question": r["question"], "answer": r["correct_answer"],
                                        "choices": [r[f"answer_{c}"] for c in "abcd"]}) + "\n" for r in rows))
    return path


def _plan(tasks, base_url=None):
    from llmctl.eval.run import EvalPlan

    cfg = EvalConfig(num_windows=2, window_len=128, limit=8)
    return EvalPlan(candidates=("default",), tasks=tasks, config=cfg, base_url=base_url,
                    engine_args={"device": "cpu", "dtype": "float32", "max_model_len": MAX_MODEL_LEN})


def test_cloze_mc_and_ppl_through_the_server_equal_the_engine(server, mc_task):
    from llmctl.eval.run import evaluate

    tasks = ("ppl", "cloze", str(mc_task))
    local = evaluate(_plan(tasks))["candidates"][0]
    remote = evaluate(_plan(tasks, base_url=server))["candidates"][0]
    assert remote["identity"]["backend"] == "server" and local["identity"]["backend"] == "engine"
    assert remote["details"]["mmlu8"]["picks"] == local["details"]["mmlu8"]["picks"]
    assert len(local["details"]["mmlu8"]["picks"]) == 8
    for key in ("cloze_acc", "mmlu8_acc", "mmlu8_acc_norm", "cloze_num_docs"):
        assert remote["metrics"][key] == local["metrics"][key], key
    for key in ("ppl", "cloze_ppl"):
        assert remote["metrics"][key] == pytest.approx(local["metrics"][key], rel=1e-4), key


def test_cloze_loglikelihoods_per_document_equal(server, default_model_dir):
    from llmctl.eval.backends import EngineBackend
    from llmctl.eval.cloze import cloze_docs, cloze_requests
    from llmctl.eval.server_backend import ServerBackend
    from llmctl.llm import LLM
    from llmctl.models.loader import load_tokenizer

    tokenizer = load_tokenizer(default_model_dir)
    requests = cloze_requests(tokenizer, cloze_docs(6))
    remote = ServerBackend(server, "default", tokenizer).loglikelihood(requests)
    engine = EngineBackend(LLM("default", device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN))
    local = engine.loglikelihood(requests)
    engine.close()
    assert [g for _, g in remote] == [g for _, g in local]
    assert any(g for _, g in local) and not all(g for _, g in local)  # both outcomes occur
    for (a, _), (b, _) in zip(remote, local):
        assert a == pytest.approx(b, abs=1e-4)


class _NoLogprobs(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"id": "x", "object": "text_completion", "model": "m",
                           "choices": [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": "length"}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


def test_a_server_without_prompt_logprobs_is_one_clear_error():
    from typer.testing import CliRunner

    from llmctl.cli.main import app
    from llmctl.eval.server_backend import ServerError

    httpd = HTTPServer(("127.0.0.1", 0), _NoLogprobs)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        result = CliRunner().invoke(app, ["eval", "m", "--base-url", f"http://127.0.0.1:{httpd.server_port}",
                                          "--tasks", "ppl", "--num-windows", "1", "--window-len", "32"])
    finally:
        httpd.shutdown()
    assert isinstance(result.exception, ServerError)
    assert "returned no prompt logprobs for echo=true" in str(result.exception)
