"""Shared fixtures: the embedded default model, converted once per machine."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The converted default model (SmolLM2-135M-Instruct, fp32 safetensors HF dir).

    Lives in LLMCTL_HOME if set, else the user cache, so the ~25 s conversion from
    the GGUF happens once per machine, not once per test run.
    """
    from llmctl.models.default import ensure_default_model

    return ensure_default_model()
