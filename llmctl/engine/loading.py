"""From engine arguments to an `EngineConfig`, and from a `ModelConfig` to a loaded model
and tokenizer (real weights, or random ones with load_format="dummy")."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch

from llmctl.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from llmctl.errors import ConfigError

LOAD_FORMATS = ("auto", "dummy")
_SECTIONS = (("model", ModelConfig), ("cache", CacheConfig), ("scheduler", SchedulerConfig),
             ("parallel", ParallelConfig))


def engine_config_from_args(model: str = "default", **kwargs: Any) -> tuple[EngineConfig, str, Callable | None]:
    """vLLM-style keyword arguments (dtype=, max_model_len=, block_size=, kv_cache_memory=,
    max_num_seqs=, ...) -> (EngineConfig, load_format, progress). Unknown names are errors."""
    from llmctl.recipe import parse_size

    load_format = kwargs.pop("load_format", "auto")
    progress = kwargs.pop("progress", None)
    if load_format not in LOAD_FORMATS:
        raise ConfigError(f"load_format: must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
    if isinstance(kwargs.get("kv_cache_memory"), str):
        kwargs["kv_cache_memory"] = parse_size(kwargs["kv_cache_memory"], "kv_cache_memory")
    sections: dict[str, dict[str, Any]] = {name: {} for name, _ in _SECTIONS}
    sections["model"]["model"] = model
    for key, value in kwargs.items():
        owner = next((name for name, cls in _SECTIONS if key in {f.name for f in dataclasses.fields(cls)}), None)
        if owner is None:
            known = sorted(f.name for _, cls in _SECTIONS for f in dataclasses.fields(cls))
            raise ConfigError(f"{key}: unknown engine argument", hint=f"known: {', '.join(known)}, load_format, progress")
        sections[owner][key] = value
    config = EngineConfig(**{name: cls(**sections[name]) for name, cls in _SECTIONS})
    return config, load_format, progress


def resolve_device(device: str) -> torch.device:
    from llmctl.models.loader import _resolve_device

    return _resolve_device(device)


def load_model_and_tokenizer(model_config: ModelConfig, load_format: str, device: torch.device, device_kind: str,
                             progress: Callable[[str], None]):
    """(model, arch, tokenizer or None, display name, model dir or None)."""
    from llmctl.engine.kv_budget import resolve_dtype
    from llmctl.models.arch import load_arch
    from llmctl.models.loader import load_model, load_tokenizer, resolve_model_path

    model = model_config.model
    if load_format == "dummy":
        from llmctl.models.dummy import load_dummy_model, resolve_dummy_arch, with_quantization

        arch, model_dir = resolve_dummy_arch(model)
        arch = with_quantization(arch, model_config.quantization)
        dtype = getattr(torch, resolve_dtype(model_config.dtype, arch, device_kind))
        progress(f"random weights of {arch.num_params() / 1e9:.2f} B parameters ({dtype}) on {device}")
        module = load_dummy_model(arch, dtype, device, model_config.seed)
        tokenizer = _maybe_tokenizer(model_dir)
        return module, arch, tokenizer, _display_name(model, model_dir), model_dir
    if model.endswith((".yaml", ".yml")):
        from llmctl.recipe import load_recipe

        model = load_recipe(model).model.model
    model_dir = resolve_model_path(model, progress)
    arch = load_arch(model_dir)
    if model_config.quantization == "gptq" and not arch.is_gptq:
        raise ConfigError(f"quantization=gptq, but {model_dir} is not a GPTQ checkpoint",
                          hint="quantize it with `llmctl quantize`, or use --load-format dummy for random GPTQ weights")
    dtype = resolve_dtype(model_config.dtype, arch, device_kind)
    progress(f"loading weights from {model_dir} ({dtype})")
    module = load_model(model_dir, dtype, str(device))
    return module, arch, load_tokenizer(model_dir), _display_name(model, model_dir), model_dir


def _maybe_tokenizer(model_dir: Path | None):
    if model_dir is None or not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from llmctl.models.loader import load_tokenizer

    return load_tokenizer(model_dir)


def _display_name(model: str, model_dir: Path | None) -> str:
    if model == "default" and model_dir is not None:
        return model_dir.name
    return Path(model).stem if model.endswith((".yaml", ".yml")) else Path(model).name
