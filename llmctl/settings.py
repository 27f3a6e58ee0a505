"""One way to resolve settings: a flag beats the recipe, the recipe beats the default.

Every command (serve, bench throughput, quantize, plan, eval) and the offline API build
their configs here, and `--show-config` prints where each value came from:

    from llmctl.settings import resolve

    s = resolve("recipes/smollm2-135m.yaml", {"cache.block_size": 32, "bench.num_prompts": None})
    s.engine            # EngineConfig: model, cache, scheduler, parallel
    s.quant, s.eval     # QuantConfig (GPTQ fields under .gptq), EvalConfig
    s.serve, s.bench    # ServeConfig, BenchConfig
    s.source("cache.block_size")    # "flag"; "recipe" or "default" otherwise
    s.rows()            # [(name, value, source), ...] for --show-config

Flags are keyed "section.field" with the recipe's section names (`model`, `quantize`,
`eval`, `cache`, `scheduler`, `parallel`, `serve`, `bench`); None means "not given".
GPTQ fields sit directly in `quantize` (`quantize.bits`), as in the recipe. The model
argument is `model.model`. Configs are validated once, when built.

A new command follows the same three steps; for `llmctl eval`, say:

    settings = resolve(model, {"eval.num_windows": num_windows, "model.dtype": dtype}, recipe=recipe)
    if show_config:
        print_settings(settings, EVAL_SECTIONS)   # model, cache, scheduler, parallel, eval
        return
    run(settings.engine, settings.eval)           # frozen EngineConfig and EvalConfig

(`LLMEngine.from_engine_args(model, **engine_args)` resolves vLLM-style keyword arguments the
same way, through `engine_flags`.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from llmctl.config import EngineConfig, GPTQConfig, QuantConfig
from llmctl.errors import ConfigError
from llmctl.recipe import QUANTIZE_GPTQ_FIELDS, SECTIONS, SIZE_FIELDS, Recipe, load_recipe
from llmctl.units import parse_size

RECIPE_SUFFIXES = (".yaml", ".yml")
ENGINE_SECTIONS = ("model", "cache", "scheduler", "parallel")
# What each command's --show-config prints: sections, or single "section.field" names.
SERVE_SECTIONS = (*ENGINE_SECTIONS, "serve")
BENCH_SECTIONS = (*ENGINE_SECTIONS, "bench")
PLAN_SECTIONS = ENGINE_SECTIONS
QUANTIZE_SECTIONS = ("model.model", "model.device", "quantize", "eval")
EVAL_SECTIONS = (*ENGINE_SECTIONS, "eval")
_SECRETS = ("serve.api_key",)
FLAG, RECIPE, DEFAULT = "flag", "recipe", "default"


def is_recipe(model_or_recipe: str | None) -> bool:
    """The one test of "is this argument a recipe file": its suffix."""
    return model_or_recipe is not None and str(model_or_recipe).lower().endswith(RECIPE_SUFFIXES)


def _fields(section: str) -> tuple[str, ...]:
    names = [f.name for f in dataclasses.fields(SECTIONS[section]) if f.name != "gptq"]
    return (*QUANTIZE_GPTQ_FIELDS, *names) if section == "quantize" else tuple(names)


ALL_FIELDS: tuple[str, ...] = tuple(f"{s}.{name}" for s in SECTIONS for name in _fields(s))


@dataclass(frozen=True)
class Setting:
    value: Any
    source: str  # "flag" | "recipe" | "default" (eval: also "checkpoint", a gate the checkpoint records)


@dataclass(frozen=True)
class Settings:
    """Resolved settings: one value and its source for every "section.field"."""

    values: Mapping[str, Setting]
    recipe: Recipe | None = None

    def value(self, name: str) -> Any:
        return self.values[name].value

    def source(self, name: str) -> str:
        return self.values[name].source

    def _section(self, section: str) -> dict[str, Any]:
        prefix = f"{section}."
        return {k[len(prefix):]: v.value for k, v in self.values.items() if k.startswith(prefix)}

    def _build(self, section: str) -> Any:
        kwargs = self._section(section)
        try:
            if section == "quantize":
                gptq = GPTQConfig(**{k: kwargs.pop(k) for k in QUANTIZE_GPTQ_FIELDS})
                return QuantConfig(gptq=gptq, **kwargs)
            return SECTIONS[section](**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{section}.{err}", hint=err.hint) from None

    @property
    def engine(self) -> EngineConfig:
        return EngineConfig(**{s: self._build(s) for s in ENGINE_SECTIONS})

    # ModelConfig, QuantConfig, EvalConfig, ServeConfig, BenchConfig: built (and validated) on each access.
    model = property(lambda self: self._build("model"))
    quant = property(lambda self: self._build("quantize"))
    eval = property(lambda self: self._build("eval"))
    serve = property(lambda self: self._build("serve"))
    bench = property(lambda self: self._build("bench"))

    def rows(self, only: tuple[str, ...] | None = None) -> list[tuple[str, Any, str]]:
        """(name, value, source) for `--show-config`, in section order, for the sections or
        "section.field" names in `only` (None: all). An inline `model.arch` shows as its
        architecture and size, a secret as `***`."""
        out = []
        for name, setting in self.values.items():
            if only is not None and name not in only and name.split(".", 1)[0] not in only:
                continue
            value = setting.value
            if name == "model.arch" and isinstance(value, dict):
                value = f"inline {(value.get('architectures') or ['?'])[0]}, {len(value)} fields"
            elif name in _SECRETS and value is not None:
                value = "***"
            out.append((name, value, setting.source))
        return out


def resolve(model_or_recipe: str | None, flags: Mapping[str, Any] | None = None,
            recipe: str | Path | None = None) -> Settings:
    """Flags over the recipe over the defaults. `model_or_recipe` is a model (`default`, a
    local dir; it counts as a flag) or a recipe file (then its `model.path` is the model);
    `recipe` is a recipe given beside a model (`--recipe`). Unknown flag names are errors."""
    flags = dict(flags or {})
    unknown = sorted(k for k in flags if k not in ALL_FIELDS)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}", hint="settings are named section.field")
    if is_recipe(model_or_recipe):
        if recipe is not None:
            raise ConfigError(f"two recipes: {model_or_recipe} and --recipe {recipe}")
        recipe, model_or_recipe = model_or_recipe, None
    if model_or_recipe is not None and flags.get("model.model") is None:
        flags["model.model"] = str(model_or_recipe)
    loaded = load_recipe(recipe) if recipe is not None else None
    values: dict[str, Setting] = {}
    for name in ALL_FIELDS:
        given = flags.get(name)
        if given is not None:
            if name in SIZE_FIELDS and isinstance(given, str):
                given = parse_size(given, "--" + name.split(".", 1)[1].replace("_", "-"))
            values[name] = Setting(given, FLAG)
        elif loaded is not None and name in loaded.explicit:
            values[name] = Setting(loaded.value(name), RECIPE)
        else:
            values[name] = Setting(_default(name), DEFAULT)
    return Settings(values, loaded)


def _default(name: str) -> Any:
    section, field = name.split(".", 1)
    cls = GPTQConfig if section == "quantize" and field in QUANTIZE_GPTQ_FIELDS else SECTIONS[section]
    f = next(f for f in dataclasses.fields(cls) if f.name == field)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def engine_flags(engine_args: Mapping[str, Any]) -> dict[str, Any]:
    """vLLM-style engine arguments (dtype=, block_size=, max_num_seqs=, ...) as "section.field"
    flags. A name no engine section has is an error."""
    owners = {name.split(".", 1)[1]: name for name in ALL_FIELDS if name.split(".", 1)[0] in ENGINE_SECTIONS}
    unknown = sorted(k for k in engine_args if k not in owners)
    if unknown:
        raise ConfigError(f"{', '.join(unknown)}: unknown engine argument",
                          hint=f"known: {', '.join(sorted(owners))}, load_format, progress")
    return {owners[k]: v for k, v in engine_args.items()}


def print_settings(settings: Settings, only: tuple[str, ...], echo: Any = print) -> None:
    """`--show-config`: every setting a command uses, its value and where it came from, one
    per line on stdout (`cache.block_size = 32  [flag]`)."""
    where = f" (recipe {settings.recipe.path})" if settings.recipe is not None and settings.recipe.path else ""
    echo(f"# settings: flag > recipe > default{where}")
    rows = settings.rows(only)
    width = max(len(name) for name, _, _ in rows)
    for name, value, source in rows:
        echo(f"{name:<{width}} = {value!r}  [{source}]")
