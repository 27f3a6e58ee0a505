"""The README stays executable: every `llmctl` command it shows parses against the CLI as
written, the cheap ones and the quickstart (offline snippet, server with curl's body and the
openai client) run as written, and the walk's quick quantize runs in the slow suite."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from servers import free_port, wait_healthy
from typer.main import get_command
from typer.testing import CliRunner

from llmctl.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _commands() -> list[list[str]]:
    """Every `llmctl ...` line of the README's bash blocks, continuations joined, comments cut."""
    out = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for i, word in enumerate(words):  # the shell's, not llmctl's: `cmd &`, `cmd | jq`
                if word in ("&", "&&", "|", ";", ">"):
                    words = words[:i]
                    break
            if words[:1] == ["llmctl"]:
                out.append(words[1:])
    return out


COMMANDS = _commands()


def test_the_readme_shows_the_walk():
    names = {" ".join(c[:2]) for c in COMMANDS}
    assert {"quantize default", "serve smollm2-gptq", "models --convert"} <= names
    assert any(c[:2] == ["bench", "throughput"] and "--baseline" in c for c in COMMANDS)
    assert any(c[0] == "eval" and "smollm2-gptq" in c for c in COMMANDS)


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_every_readme_command_parses(args):
    """Options, values and subcommands as written (nothing runs): a renamed flag fails here."""
    command, name, rest, parent = get_command(app), "llmctl", list(args), None
    while hasattr(command, "resolve_command"):  # a group: its options, then the subcommand
        parent = command.make_context(name, rest, parent=parent)
        if not parent._protected_args + parent.args:
            return  # a group run as a command (`bench serve --num-prompts 64`): its options parsed
        name, command, rest = command.resolve_command(parent, parent._protected_args + parent.args)
    with command.make_context(name, rest, parent=parent):
        pass


@pytest.mark.parametrize("args", [c for c in COMMANDS if c[0] in ("models", "plan")],
                         ids=lambda c: " ".join(c))
def test_readme_commands_that_load_no_weights_run(args, default_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    if any("smollm2-gptq" in a for a in args):
        pytest.skip("needs the walk's checkpoint (the slow test makes it)")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (args, result.output, result.exception)


def test_the_offline_snippet_runs(default_model_dir, capsys):
    snippet = next(b for b in _blocks("python") if "LLM(" in b)
    exec(compile(snippet, "README.md", "exec"), {})
    assert "Paris" in capsys.readouterr().out


def test_the_quickstart_server_answers_curl_and_the_openai_client(default_model_dir, tmp_path):
    """`llmctl serve` as the quickstart runs it, on a free port instead of 8000."""
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    serve = next(shlex.split(line, comments=True) for line in quickstart.splitlines() if line.startswith("llmctl serve"))
    body = re.search(r"-d '(\{.*?\})'", quickstart, flags=re.S).group(1)
    client_snippet = next(b for b in _blocks("python") if "OpenAI(" in b)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LLMCTL_API_KEY", None)
    log = tmp_path / "serve.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "llmctl", *serve[1:], "--port", str(port),
                                 "--max-model-len", "512", "--kv-cache-memory", "64MiB"],
                                stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url, log, 180, 0.3)
        res = httpx.post(url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"},
                         timeout=120)
        reply = res.json()["choices"][0]  # sampled at the default temperature: any text
        assert res.status_code == 200 and reply["message"]["content"].strip() and reply["finish_reason"]
        code = client_snippet.replace("http://127.0.0.1:8000", url)
        exec(compile(code, "README.md", "exec"), {"print": lambda *a: None})
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.mark.slow
def test_the_walk_quick_quantize_serve_and_bench(default_model_dir, tmp_path, monkeypatch):
    """Steps 3 (the quick try, as written), and the bench against the original."""
    monkeypatch.chdir(tmp_path)
    quick = next(c for c in COMMANDS if c[:2] == ["quantize", "default"] and "--no-eval" in c)
    result = CliRunner().invoke(app, quick)
    assert result.exit_code == 0, result.output
    out = quick[quick.index("-o") + 1]
    bench = next(c for c in COMMANDS if c[:2] == ["bench", "throughput"] and "--baseline" in c)
    bench = [out if a == "smollm2-gptq" else a for a in bench]
    result = CliRunner().invoke(app, [*bench, "--num-prompts", "2", "--output-len", "8"])
    assert result.exit_code == 0, result.output
