"""Every command's --help as a person reads it in an 80-column terminal: no option name cut
short, no line past 80 columns, examples at the end, one way to show a default."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

COMMANDS = ["", "quantize", "eval", "serve", "models", "plan", "bench", "bench throughput", "bench serve",
            "bench serve sweep", "bench kernels"]
# Renders every page in one process (a process per page would cost ~1 s each on a busy 2-core machine).
_RENDER = """
import json, sys
from typer.testing import CliRunner
from llmctl.cli.main import app
pages = {}
for cmd in json.loads(sys.argv[1]):
    res = CliRunner().invoke(app, [*cmd.split(), "--help"], terminal_width=80)
    pages[cmd] = [res.exit_code, res.output]
print(json.dumps(pages))
"""


@pytest.fixture(scope="module")
def pages() -> dict[str, str]:
    env = {**os.environ, "COLUMNS": "80", "TERMINAL_WIDTH": "80", "NO_COLOR": "1"}
    env.pop("FORCE_COLOR", None)
    res = subprocess.run([sys.executable, "-c", _RENDER, json.dumps(COMMANDS)], capture_output=True, text=True,
                         env=env, check=True)
    out = json.loads(res.stdout)
    assert all(code == 0 for code, _ in out.values()), {k: v for k, v in out.items() if v[0]}
    return {cmd: text for cmd, (_, text) in out.items()}


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_fits_80_columns_with_every_option_name_whole(pages, cmd):
    text = pages[cmd]
    assert "Usage:" in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text, text
    # every option the command takes appears whole in its page
    from typer.main import get_command

    from llmctl.cli.main import app

    command = get_command(app)
    for part in cmd.split():
        command = command.commands[part]
    for param in command.params:
        for name in [*param.opts, *param.secondary_opts]:
            if name.startswith("--"):
                assert re.search(re.escape(name) + r"(?![\w-])", text), f"{cmd}: {name} missing or cut"


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c not in ("", "bench")])
def test_every_command_ends_with_examples(pages, cmd):
    text = pages[cmd]
    if "Not built yet" in text:
        pytest.skip(f"llmctl {cmd} is a stub")
    tail = text[text.rindex("╰"):] if "╰" in text else text
    assert "Examples" in tail, text
    examples = [line.strip() for line in tail.splitlines() if line.strip().startswith("llmctl ")]
    assert 2 <= len(examples) <= 3, tail
    assert all(e.startswith(f"llmctl {cmd}") for e in examples), examples


@pytest.mark.parametrize("cmd", COMMANDS)
def test_one_format_for_defaults(pages, cmd):
    text = pages[cmd]
    assert not re.search(r"\(default[ :]", text), "defaults are shown as [default: X]"
    assert not re.search(r"\[\d[^\]]*\]", text.replace("[default:", "")), "defaults are shown as [default: X]"
