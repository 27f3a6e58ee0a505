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

    @property
    def baseline_cache_dir(self) -> Path:
        from llmctl.paths import llmctl_home

        return self.cache_dir or llmctl_home() / "eval-cache"

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


def available_host_memory() -> int:
    """Bytes this process can still take: MemAvailable on Linux, else the physical memory."""
    import os

    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_baseline_fits(num_tokens: int, top_k: int, vocab_size: int, memory: int, disk: int | None) -> int:
    """The baseline's rows for KLD, checked before any model loads: they are held twice while
    the baseline's windows are joined, so twice their size must fit in `memory`, and once in
    `disk` (the cache's free space; None: no cache). Returns their size in bytes."""
    from llmctl.eval.kld import baseline_bytes_per_token
    from llmctl.units import format_bytes

    size = num_tokens * baseline_bytes_per_token(top_k, vocab_size)
    kept = f"whole rows of {vocab_size:,}" if top_k == 0 else f"top-{top_k}"
    what = f"kld: the baseline's rows ({kept} for {num_tokens:,} tokens) take {format_bytes(size)}"
    smaller = "fewer --num-windows, a shorter --window-len" + (", or --kld-top-k 256" if top_k == 0 else "")
    if 2 * size > memory:
        raise ConfigError(f"{what}, held twice; {format_bytes(memory)} of memory is available",
                          hint=smaller)
    if disk is not None and size > disk:
        raise ConfigError(f"{what}; the cache's disk has {format_bytes(disk)} free",
                          hint=f"--no-cache, {smaller}, or LLMCTL_HOME on a larger disk")
    return size


def _free_disk(path: Path) -> int:
    import shutil

    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _no_stage(label: str, total: int) -> Callable[[int], None]:
    return lambda k: None


def evaluate(plan: EvalPlan, stage: StageFn | None = None) -> dict:
    """The report (see llmctl.eval.report.build_report) of every candidate against the baseline."""
    from llmctl.eval.report import build_report
    from llmctl.eval.scoring_run import ModelRun

    stage = stage or _no_stage
    started = time.perf_counter()
    if not plan.base_url:
        from llmctl.models.loader import resolve_device

        resolve_device(plan.engine_args.get("device", "auto"))  # a device that is not here fails first
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
        if "kld" in tasks:
            from llmctl.models.arch import load_arch

            check_baseline_fits(windows.num_scored, cfg.kld_top_k, load_arch(dirs[plan.baseline]).vocab_size,
                                available_host_memory(), _free_disk(plan.baseline_cache_dir) if plan.use_cache else None)
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
