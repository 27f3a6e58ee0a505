import os
import subprocess
import sys


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "llmctl", *args], capture_output=True, text=True, env=full_env)


def test_help_lists_the_four_commands():
    res = run_cli("--help")
    assert res.returncode == 0
    for cmd in ("quantize", "eval", "serve", "bench"):
        assert cmd in res.stdout


def test_help_does_not_import_torch():
    code = "import sys; from llmctl.cli.main import app; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "False"


