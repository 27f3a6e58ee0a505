"""Local multiple-choice tasks: a JSONL file, or a subset of lm-eval's task YAML over a local file.

JSONL, one question a line:
    {"question": "2 + 2 =", "choices": ["3", "4", "5"], "answer": 1}
`answer` is the index of the right choice, its letter ("B") or its text ("4"). The prompt is
"Question: {question}\\nAnswer:" and each choice follows after one space.

YAML (lm-eval's keys): `task`, `dataset_path: json` (or parquet) with
`dataset_kwargs: {data_files: {test: FILE}}` (or a plain `data_files: FILE`), `test_split`,
`doc_to_text`, `doc_to_choice`, `doc_to_target`, `target_delimiter` (default " "),
`fewshot_delimiter` (default "\\n\\n"). Each `doc_to_*` is a field name, a Jinja template or,
for choices, a list. Few-shot examples are the file's first documents, which are then not
evaluated. Everything else of lm-eval (filters, generation tasks, the Hub) is refused or ignored.
"""

from __future__ import annotations

import ast
from pathlib import Path

from llmctl.errors import ConfigError
from llmctl.eval.jsonl import read_jsonl
from llmctl.eval.multiple_choice import MCDoc, MCTask

_YAML_KEYS = {"task", "dataset_path", "dataset_name", "dataset_kwargs", "data_files", "test_split", "output_type",
              "doc_to_text", "doc_to_choice", "doc_to_target", "target_delimiter", "fewshot_delimiter",
              "metric_list", "num_fewshot", "description", "validation_split", "training_split", "tag", "group",
              "metadata", "fewshot_split"}




def _answer_index(answer, choices: list[str], where: str) -> int:
    if isinstance(answer, bool):
        raise ConfigError(f"{where}: answer must be an index, a letter or a choice's text, got {answer!r}")
    if isinstance(answer, int):
        index = answer
    elif isinstance(answer, str) and answer.strip().isdigit():
        index = int(answer)
    elif isinstance(answer, str) and answer in choices:
        index = choices.index(answer)
    elif isinstance(answer, str) and len(answer) == 1 and answer.upper() in "ABCDEFGHIJ":
        index = "ABCDEFGHIJ".index(answer.upper())
    else:
        raise ConfigError(f"{where}: answer {answer!r} is not an index, a letter or one of the choices")
    if not 0 <= index < len(choices):
        raise ConfigError(f"{where}: answer {index} is outside the {len(choices)} choices")
    return index


def _finish(name: str, items: list[tuple[str, list[str], int]], num_fewshot: int, limit: int | None,
            target_delimiter: str, fewshot_delimiter: str) -> MCTask:
    if num_fewshot >= len(items):
        raise ConfigError(f"num_fewshot: task {name} has {len(items)} documents, {num_fewshot} few-shot asked")
    shots = "".join(f"{text}{target_delimiter}{choices[ans]}{fewshot_delimiter}"
                    for text, choices, ans in items[:num_fewshot])
    docs = tuple(MCDoc(prompt=shots + text, choices=tuple(target_delimiter + c for c in choices), answer=ans,
                       group=name) for text, choices, ans in items[num_fewshot:][:limit])
    return MCTask(name, docs)


def jsonl_task(path: Path, num_fewshot: int = 0, limit: int | None = None) -> MCTask:
    items = []
    for number, (_, row) in enumerate(read_jsonl(path, "task"), 1):
        where = f"task: {path} document {number}"
        question, choices = row.get("question"), row.get("choices")
        if not isinstance(question, str) or not question.strip():
            raise ConfigError(f"{where}: needs a non-empty string 'question'")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ConfigError(f"{where}: needs 'choices', a list of at least 2 strings")
        if "answer" not in row:
            raise ConfigError(f"{where}: needs 'answer'")
        items.append((f"Question: {question.strip()}\nAnswer:", choices, _answer_index(row["answer"], choices, where)))
    return _finish(path.stem, items, num_fewshot, limit, " ", "\n\n")


def _render(spec, doc: dict, env):
    if isinstance(spec, str) and spec in doc:
        return doc[spec]
    if isinstance(spec, str):
        return env.from_string(spec).render(**doc)
    return spec


def _yaml_data_file(cfg: dict, path: Path) -> Path:
    files = cfg.get("data_files") or (cfg.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        split = cfg.get("test_split", "test")
        files = files.get(split)
    if not isinstance(files, str):
        raise ConfigError(f"task: {path}: needs a local data file (dataset_kwargs.data_files.test or data_files)",
                          hint="llmctl never downloads a task's data set")
    data = Path(files).expanduser()
    return data if data.is_absolute() else (path.parent / data)


def yaml_task(path: Path, num_fewshot: int | None = None, limit: int | None = None) -> MCTask:
    import jinja2
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"task: {path} is not valid YAML: {err}") from err
    if not isinstance(cfg, dict):
        raise ConfigError(f"task: {path} must be a mapping of lm-eval task keys")
    unknown = sorted(set(cfg) - _YAML_KEYS)
    if unknown:
        raise ConfigError(f"task: {path}: keys {', '.join(unknown)} are outside the supported lm-eval subset")
    if cfg.get("output_type", "multiple_choice") != "multiple_choice":
        raise ConfigError(f"task: {path}: output_type {cfg['output_type']!r}; only multiple_choice is supported")
    for key in ("doc_to_text", "doc_to_choice", "doc_to_target"):
        if key not in cfg:
            raise ConfigError(f"task: {path}: {key} is required")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    items = []
    for number, (_, doc) in enumerate(read_jsonl(_yaml_data_file(cfg, path), "task data"), 1):
        where = f"task: {path} document {number}"
        try:
            text = str(_render(cfg["doc_to_text"], doc, env))
            choices = _render(cfg["doc_to_choice"], doc, env)
            if isinstance(choices, str):
                choices = ast.literal_eval(choices)
            target = _render(cfg["doc_to_target"], doc, env)
        except (jinja2.TemplateError, ValueError, SyntaxError) as err:
            raise ConfigError(f"{where}: {err}") from err
        if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
            raise ConfigError(f"{where}: doc_to_choice must give a list of strings, got {choices!r}")
        items.append((text, list(choices), _answer_index(target, list(choices), where)))
    shots = cfg.get("num_fewshot", 0) if num_fewshot is None else num_fewshot
    return _finish(str(cfg.get("task", path.stem)), items, shots, limit, cfg.get("target_delimiter", " "),
                   cfg.get("fewshot_delimiter", "\n\n"))
