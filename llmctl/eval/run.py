"""`evaluate(plan)`: everything `llmctl eval` does, as a library call (quantize's check calls
it too). Order: check every input that needs no weights (tasks, files, tokenizers), cut the
windows, run the baseline once (its rows from the disk cache when present), then each
candidate; compare, gate, report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from llmctl.config import EvalConfig
from llmctl.errors import ConfigError

BUILTIN_TASKS = ("ppl", "kld", "cloze", "mmlu")
# (stage label, total) -> advance(k): the CLI draws a bar per stage; the library never draws
StageFn = Callable[[str, int], Callable[[int], None]]


@dataclass(frozen=True)
class EvalPlan:
    candidates: tuple[str, ...]  # `default`, model dirs, recipes; served model names with base_url
    baseline: str | None = None
    tasks: tuple[str, ...] = ("ppl", "kld", "cloze")
    config: EvalConfig = field(default_factory=EvalConfig)
    engine_args: dict = field(default_factory=dict)  # LLM(...) keyword arguments (device, dtype, ...)
    base_url: str | None = None
    tokenizer: str | None = None  # with base_url: a local model dir whose tokenizer the server uses
    api_key: str | None = None
    cache_dir: Path | None = None  # baseline rows; None: $LLMCTL_HOME/eval-cache
    use_cache: bool = True

    def __post_init__(self) -> None:
        if not self.candidates:
            raise ConfigError("MODEL: name at least one model to evaluate")
        if "kld" in self.tasks and self.baseline is None:
            raise ConfigError("tasks: kld compares with a baseline", hint="add --baseline default (or a model dir)")
        if self.base_url and "kld" in self.tasks:
            raise ConfigError("tasks: kld needs full-vocabulary log-probs, which /v1/completions does not return",
                              hint="evaluate kld in-process; --base-url supports ppl, cloze, mmlu and local tasks")


def resolve_tasks(tasks: tuple[str, ...], config: EvalConfig) -> dict:
    """name -> None (ppl, kld, cloze) or an MCTask. Unknown names and bad files fail here."""
    from llmctl.eval.multiple_choice import mmlu_task
    from llmctl.eval.task_files import jsonl_task, yaml_task

    resolved: dict = {}
    for name in tasks:
        if name in ("ppl", "kld", "cloze"):
            resolved[name] = None
        elif name == "mmlu":
            resolved[name] = mmlu_task(config.num_fewshot, config.limit)
        elif name.endswith(".jsonl"):
            task = jsonl_task(Path(name).expanduser(), config.num_fewshot, config.limit)
            resolved[task.name] = task
        elif name.endswith((".yaml", ".yml")):
            task = yaml_task(Path(name).expanduser(), None if config.num_fewshot == 0 else config.num_fewshot,
                             config.limit)
            resolved[task.name] = task
        else:
            raise ConfigError(f"tasks: unknown task {name!r}",
                              hint=f"one of {', '.join(BUILTIN_TASKS)}, a local .jsonl task or an lm-eval .yaml")
    return resolved


def _model_dir(name: str) -> Path:
    from llmctl.models.loader import resolve_model_path

    if name.endswith((".yaml", ".yml")):
        from llmctl.recipe import load_recipe

        name = load_recipe(name).model.model
    return resolve_model_path(name)


def check_tokenizers(dirs: dict[str, Path]) -> object:
    """Every model must share the first one's vocabulary (token -> id) and vocab size."""
    from llmctl.models.arch import load_arch
    from llmctl.models.loader import load_tokenizer

    first_name, first_dir = next(iter(dirs.items()))
    first_tok, first_vocab = load_tokenizer(first_dir), load_arch(first_dir).vocab_size
    first_map = first_tok.get_vocab()
    for name, path in list(dirs.items())[1:]:
        vocab = load_arch(path).vocab_size
        if vocab != first_vocab:
            raise ConfigError(f"{name}: vocabulary of {vocab} tokens, {first_name} has {first_vocab}",
                              hint="a baseline and its candidates must share one tokenizer")
        if load_tokenizer(path).get_vocab() != first_map:
            raise ConfigError(f"{name}: its tokenizer maps tokens to ids differently from {first_name}'s",
                              hint="a baseline and its candidates must share one tokenizer")
    return first_tok


def _no_stage(label: str, total: int) -> Callable[[int], None]:
    return lambda k: None


def evaluate(plan: EvalPlan, stage: StageFn | None = None) -> dict:
    """The report (see llmctl.eval.report.build_report) of every candidate against the baseline."""
    from llmctl.eval.report import build_report
    from llmctl.eval.scoring_run import ModelRun

    stage = stage or _no_stage
    started = time.perf_counter()
    tasks = resolve_tasks(plan.tasks, plan.config)
    if plan.base_url:
        tokenizer_dir = _model_dir(plan.tokenizer or "default")
        tokenizer = check_tokenizers({"tokenizer": tokenizer_dir})
        dirs = {}
    else:
        names = ([plan.baseline] if plan.baseline else []) + list(plan.candidates)
        dirs = {n: _model_dir(n) for n in dict.fromkeys(names)}
        tokenizer = check_tokenizers(dirs)
    windows = None
    if "ppl" in tasks or "kld" in tasks:
        from llmctl.eval.windows import eval_windows

        cfg = plan.config
        windows = eval_windows(tokenizer, cfg.dataset, cfg.window_len, cfg.stride, cfg.num_windows)
    base = None
    if plan.baseline is not None:
        base = ModelRun(plan, plan.baseline, dirs.get(plan.baseline), tokenizer, windows, tasks, stage)
        base.run_baseline()
    results = []
    for name in plan.candidates:
        run = ModelRun(plan, name, dirs.get(name), tokenizer, windows, tasks, stage)
        run.run_candidate(base)
        results.append(run)
    return build_report(plan, windows, base, results, time.perf_counter() - started)
