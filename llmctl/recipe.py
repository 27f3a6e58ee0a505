"""Recipes: one YAML file carrying a model and its quantize, eval, serve and bench settings.

`load_recipe(path)` returns a frozen `Recipe` of validated config dataclasses. An
unknown key, a wrong type or an invalid value is a `ConfigError` naming the field
(`quantize.group_size: ...`). The schema is documented in recipes/README.md.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.config import (
    BenchConfig,
    CacheConfig,
    EvalConfig,
    GPTQConfig,
    ModelConfig,
    ParallelConfig,
    QuantConfig,
    SchedulerConfig,
    ServeConfig,
)
from llmctl.errors import ConfigError
from llmctl.units import parse_size

# YAML section -> config class; `quantize` holds its GPTQ fields beside the class's own.
# `model.arch` (inline config.json fields) is checked where it is used (`llmctl plan`, random
# weights), by llmctl.models.arch.
SECTIONS: dict[str, type] = {
    "model": ModelConfig, "quantize": QuantConfig, "eval": EvalConfig, "cache": CacheConfig,
    "scheduler": SchedulerConfig, "parallel": ParallelConfig, "serve": ServeConfig, "bench": BenchConfig,
}

# The quantize section is flat in YAML: GPTQ fields (as quantize_config.json names them)
# beside the calibration fields. The checkpoint format follows `sym`, so it is not one of them.
QUANTIZE_GPTQ_FIELDS = tuple(f.name for f in dataclasses.fields(GPTQConfig) if f.name != "checkpoint_format")
# Fields given as sizes ("2GiB"), in a recipe or as a flag.
SIZE_FIELDS = frozenset({"cache.kv_cache_memory"})


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path | None
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    # The "section.field" names the file sets (model.path counts as model.model): the
    # values `llmctl.settings.resolve` takes from the recipe rather than the defaults.
    explicit: frozenset[str] = frozenset()

    def value(self, name: str) -> Any:
        """The value of "section.field" (GPTQ fields of `quantize` included)."""
        section, key = name.split(".", 1)
        config = self.quant if section == "quantize" else getattr(self, section)
        if section == "quantize" and key in QUANTIZE_GPTQ_FIELDS:
            config = config.gptq
        return getattr(config, key)


def _check_type(value: Any, hint: Any, name: str) -> Any:
    """Light type check of a YAML value against a dataclass field annotation."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, name)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{name}: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls: type, raw: Any, section: str, extra_names: tuple[str, ...] = ()) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            known = sorted((names | set(extra_names)) - {"gptq"})
            raise ConfigError(f"{section}.{key}: unknown field", hint=f"known fields: {', '.join(known)}")
        if f"{section}.{key}" in SIZE_FIELDS and value is not None:
            value = parse_size(value, f"{section}.{key}")
        kwargs[key] = _check_type(value, hints[key], f"{section}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{section}.{err}", hint=err.hint) from None


def _build_quant(raw: Any) -> QuantConfig:
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"quantize: expected a mapping, got {type(raw).__name__}")
    gptq = {k: v for k, v in raw.items() if k in QUANTIZE_GPTQ_FIELDS}
    rest = {k: v for k, v in raw.items() if k not in QUANTIZE_GPTQ_FIELDS}
    if "gptq" in rest:
        raise ConfigError("quantize.gptq: unknown field", hint="GPTQ fields sit directly in the quantize section")
    calibration = _build(QuantConfig, rest, "quantize", extra_names=QUANTIZE_GPTQ_FIELDS)
    return dataclasses.replace(calibration, gptq=_build(GPTQConfig, gptq, "quantize"))


def recipe_from_dict(raw: Any, path: Path | None = None) -> Recipe:
    where = str(path) if path else "recipe"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a recipe is a YAML mapping, got {type(raw).__name__}")
    known = {"name", *SECTIONS}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where}: unknown section {key!r}", hint=f"known sections: {', '.join(sorted(known))}")
    model_raw = dict(raw.get("model") or {})
    if model_raw.get("arch") is not None and not isinstance(model_raw["arch"], dict):
        raise ConfigError(f"{where}: model.arch must be a mapping of config.json fields")
    if "path" in model_raw:
        model_raw["model"] = str(model_raw.pop("path"))
    sections = {key: _build(cls, raw.get(key), key) for key, cls in SECTIONS.items() if key not in ("model", "quantize")}
    sections["quant"] = _build_quant(raw.get("quantize"))
    recipe = Recipe(
        name=str(raw.get("name") or (path.stem if path else "recipe")),
        path=path,
        model=_build(ModelConfig, model_raw, "model"),
        explicit=frozenset(f"{key}.{name}" for key, section in [("model", model_raw), *(
            (key, raw.get(key)) for key in SECTIONS if key != "model")] if isinstance(section, dict) for name in section),
        **sections,
    )
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {p} does not exist", hint="see recipes/ for examples")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {p} is not valid YAML: {err}") from err
    return recipe_from_dict(raw, p)
