"""From the command's flags (over a recipe's eval section, over the defaults, through
llmctl.settings) to an `EvalPlan`. No torch here."""

from __future__ import annotations

import json
from pathlib import Path

from llmctl.config import EVAL_FILE, EvalConfig
from llmctl.errors import ConfigError
from llmctl.eval.run import EvalPlan
from llmctl.settings import DEFAULT, ENGINE_SECTIONS, Setting, Settings, is_recipe, resolve

# The thresholds an llmctl_eval.json records and the settings that give them.
GATE_SETTINGS = {"max_ppl_increase": "eval.max_ppl_increase", "max_kld": "eval.max_kld",
                 "min_top1_agreement": "eval.min_top1_agreement", "min_recovery": "eval.min_recovery"}
CHECKPOINT = "checkpoint"  # a setting's source: the gate recorded in a checkpoint's llmctl_eval.json


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
    """Flags over the recipe over the gate the candidates' checkpoints record over the defaults."""
    if recipe is None:
        recipe = next((m for m in models if is_recipe(m)), None)
    settings = resolve(None, flags, recipe=recipe)
    recorded = recorded_gate(models)
    if not recorded:
        return settings
    values = dict(settings.values)
    for name, value in recorded.items():
        if values[name].source == DEFAULT:
            values[name] = Setting(value, CHECKPOINT)
    return Settings(values, settings.recipe)


def recorded_gate(models: tuple[str, ...]) -> dict:
    """The gate a checkpoint was last checked with (`quantize` records its recipe's there), as
    settings: checking it again applies the same thresholds, not the defaults. Only when every
    candidate that records one records the same; none, or a disagreement, gives {}."""
    gates = []
    for model in models:
        path = Path(model) / EVAL_FILE
        if not path.is_file():
            continue
        try:
            thresholds = json.loads(path.read_text()).get("thresholds")
        except (OSError, ValueError, AttributeError):
            continue  # a torn report is rewritten by this run; it sets no gate
        if isinstance(thresholds, dict):
            gates.append({GATE_SETTINGS[k]: v for k, v in thresholds.items() if k in GATE_SETTINGS})
    if not gates or any(g != gates[0] for g in gates[1:]):
        return {}
    return gates[0]


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
