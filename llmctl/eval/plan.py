"""From the command's flags (over a recipe's eval section, over the defaults, through
llmctl.settings) to an `EvalPlan`. No torch here."""

from __future__ import annotations

from llmctl.config import EvalConfig
from llmctl.errors import ConfigError
from llmctl.eval.run import EvalPlan
from llmctl.settings import DEFAULT, ENGINE_SECTIONS, Settings, is_recipe, resolve


def parse_tasks(tasks: str | None, has_baseline: bool, config: EvalConfig) -> tuple[str, ...]:
    if tasks is None:
        if config.tasks:
            return tuple(config.tasks)
        return ("ppl", "kld", "cloze") if has_baseline else ("ppl", "cloze")
    names = tuple(t.strip() for t in tasks.split(",") if t.strip())
    if not names:
        raise ConfigError("--tasks: name at least one task", hint="e.g. --tasks ppl,kld,cloze")
    return tuple(dict.fromkeys(names))


def engine_args(settings: Settings) -> dict:
    """The engine settings a flag or the recipe gave, as LLM(...) keyword arguments (each
    model of the comparison gets the same)."""
    out = {}
    for name, value, source in settings.rows(ENGINE_SECTIONS):
        if source != DEFAULT and name != "model.model":
            out[name.split(".", 1)[1]] = value
    return out


def resolve_eval_settings(models: tuple[str, ...], recipe: str | None, flags: dict) -> Settings:
    if recipe is None:
        recipe = next((m for m in models if is_recipe(m)), None)
    return resolve(None, flags, recipe=recipe)


def build_plan(models: tuple[str, ...], baseline: str | None, tasks: str | None, settings: Settings,
               base_url: str | None = None, tokenizer: str | None = None, api_key: str | None = None,
               no_cache: bool = False) -> EvalPlan:
    config = settings.eval
    if base_url is not None and not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"--base-url: expected http(s)://HOST:PORT, got {base_url!r}")
    return EvalPlan(candidates=models, baseline=baseline, tasks=parse_tasks(tasks, baseline is not None, config),
                    config=config, engine_args=engine_args(settings),
                    base_url=base_url.rstrip("/") if base_url else None, tokenizer=tokenizer, api_key=api_key,
                    use_cache=not no_cache)
