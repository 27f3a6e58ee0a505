"""Bad settings fail in a second with a message that names them, before any model loads:
a taken port, an empty API key, a size without its unit, a truncated JSON body."""

from __future__ import annotations

import socket

import httpx
import pytest
from servers import running_app
from typer.testing import CliRunner

from llmctl.cli.main import app
from llmctl.config import ServeConfig
from llmctl.errors import ConfigError


@pytest.fixture
def no_model_load(monkeypatch):
    """A tripwire: loading a model in these tests means the check came too late."""
    from llmctl.engine import llm_engine

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad setting was refused")

    monkeypatch.setattr(llm_engine.LLMEngine, "__init__", loaded)


def _serve(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, ["serve", *args], env=env)


def test_a_taken_port_fails_before_the_model_loads(no_model_load, monkeypatch):
    monkeypatch.delenv("LLMCTL_API_KEY", raising=False)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = _serve("--port", str(port))
    assert isinstance(result.exception, ConfigError), result.exception
    assert f"127.0.0.1:{port} is already in use" in str(result.exception)
    assert "--port" in result.exception.hint


def test_bind_socket_binds_the_port_it_is_given():
    from llmctl.serve.listen import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        assert port > 0
        sock.listen()  # what uvicorn does with it once the app is up
        with pytest.raises(ConfigError, match="already in use"):
            bind_socket("127.0.0.1", port)
    finally:
        sock.close()
    with pytest.raises(ConfigError, match="cannot resolve"):
        bind_socket("no-such-host.invalid", 0)


@pytest.mark.parametrize("args, env, message", [
    (["--api-key", ""], {}, "--api-key: the key is empty"),
    (["--api-key", "  "], {}, "--api-key: the key is empty"),
    ([], {"LLMCTL_API_KEY": ""}, "LLMCTL_API_KEY is set but empty"),
])
def test_an_empty_api_key_is_refused(no_model_load, monkeypatch, args, env, message):
    monkeypatch.delenv("LLMCTL_API_KEY", raising=False)
    result = _serve("--port", "0", *args, env=env)
    assert isinstance(result.exception, ConfigError) and message in str(result.exception), result.exception


def test_an_empty_api_key_in_a_config_is_refused():
    with pytest.raises(ConfigError, match="api_key: must not be empty"):
        ServeConfig(api_key="")


def _plan(*args: str):
    return CliRunner().invoke(app, ["plan", "default", "--json", *args])


def test_gpu_memory_takes_units_and_refuses_a_bare_small_number():
    import json

    result = _plan("--gpu-memory", "80")
    assert isinstance(result.exception, ConfigError), result.output
    assert "--gpu-memory: '80' has no unit" in str(result.exception) and "80GiB" in result.exception.hint
    gib = json.loads(_plan("--gpu-memory", "80GiB").stdout)
    gb = json.loads(_plan("--gpu-memory", "80GB").stdout)
    assert gib["memory_total"] == 80 * 2**30 and gb["memory_total"] == 80 * 10**9
    assert gib["num_blocks"] > gb["num_blocks"] > 0


@pytest.fixture(scope="module")
def server(default_model_dir):

    from llmctl.config import CacheConfig, EngineConfig, ModelConfig
    from llmctl.engine.llm_engine import LLMEngine
    from llmctl.serve.launcher import build_app
    from llmctl.serve.listen import bind_socket

    engine = LLMEngine(EngineConfig(model=ModelConfig(model=str(default_model_dir), max_model_len=128),
                                    cache=CacheConfig(kv_cache_memory=8 * 2**20)))
    sock = bind_socket("127.0.0.1", 0)
    with running_app(build_app(engine, ServeConfig()), sockets=[sock]):
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def test_a_truncated_json_body_is_explained_in_words(server):
    body = b'{"model": "default", "messages": [{"role"'
    res = httpx.post(server + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert res.status_code == 400
    error = res.json()["error"]
    assert error["param"] is None
    assert error["message"].startswith("the request body is not valid JSON (at character 41")
