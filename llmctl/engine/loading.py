"""From a resolved `ModelConfig` to a loaded model and tokenizer (real weights, or random
ones with load_format="dummy"). Settings arrive resolved (`llmctl.settings`): nothing here
reads a recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from llmctl.config import ModelConfig
from llmctl.errors import ConfigError

LOAD_FORMATS = ("auto", "dummy")


def check_load_format(load_format: str) -> str:
    if load_format not in LOAD_FORMATS:
        raise ConfigError(f"load_format: must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
    return load_format


def load_model_and_tokenizer(model_config: ModelConfig, load_format: str, device: torch.device, device_kind: str,
                             progress: Callable[[str], None], tp=None, with_tokenizer: bool = True):
    """(model, arch, tokenizer or None, display name, model dir or None); `tp` (a
    TensorParallel) loads this rank's shard only."""
    from llmctl.models.arch import load_arch, resolve_dtype
    from llmctl.models.loader import load_model, load_tokenizer, resolve_model_path

    model = model_config.model
    if load_format == "dummy":
        from llmctl.models.dummy import load_dummy_model, resolve_dummy_arch, with_quantization

        arch, model_dir = resolve_dummy_arch(model_config)
        arch = with_quantization(arch, model_config.quantization)
        dtype = getattr(torch, resolve_dtype(model_config.dtype, arch, device_kind))
        progress(f"random weights of {arch.num_params() / 1e9:.2f} B parameters ({dtype}) on {device}")
        module = load_dummy_model(arch, dtype, device, model_config.seed, tp)
        tokenizer = _maybe_tokenizer(model_dir) if with_tokenizer else None
        return module, arch, tokenizer, _display_name(model, model_dir), model_dir
    model_dir = resolve_model_path(model, progress)
    arch = load_arch(model_dir)
    if model_config.quantization == "gptq" and not arch.is_gptq:
        raise ConfigError(f"quantization=gptq, but {model_dir} is not a GPTQ checkpoint",
                          hint="quantize it with `llmctl quantize`, or use --load-format dummy for random GPTQ weights")
    dtype = resolve_dtype(model_config.dtype, arch, device_kind)
    progress(f"loading weights from {model_dir} ({dtype})")
    module = load_model(model_dir, dtype, str(device), tp)
    tokenizer = load_tokenizer(model_dir) if with_tokenizer else None
    return module, arch, tokenizer, _display_name(model, model_dir), model_dir


def _maybe_tokenizer(model_dir: Path | None):
    if model_dir is None or not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from llmctl.models.loader import load_tokenizer

    return load_tokenizer(model_dir)


def _display_name(model: str, model_dir: Path | None) -> str:
    if model == "default" and model_dir is not None:
        return model_dir.name
    return Path(model).name
