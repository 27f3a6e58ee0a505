"""Calibration data for GPTQ: texts from a local file or directory (read through `datasets`,
never fetched from a hub) or the embedded corpus's training split, cut into seeded token windows.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from llmctl.errors import ConfigError, QuantizationError

_LOADERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_TEXT_COLUMNS = ("text", "content", "extract", "document", "sentence")


def check_dataset(dataset: str | None) -> None:
    """Fail early on a dataset argument that is not a readable local file or directory.

    Only local data: a name that is not a path is refused rather than looked up on a hub,
    so llmctl never downloads anything at run time.
    """
    if dataset is None:
        return
    path = Path(dataset).expanduser()
    if not path.exists():
        raise ConfigError(f"dataset: {path} does not exist (a local file or directory is needed)",
                          hint=f"a {', '.join(sorted(_LOADERS))} file, or a directory of them; "
                               "llmctl never downloads data sets")
    if path.is_file() and path.suffix.lower() not in _LOADERS:
        raise ConfigError(f"dataset: {path} has an unsupported extension",
                          hint=f"use one of {', '.join(sorted(_LOADERS))}")
    if path.is_dir() and not _data_files(path):
        raise ConfigError(f"dataset: directory {path} holds no {', '.join(sorted(_LOADERS))} file")


def _data_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in _LOADERS)


def load_calibration_texts(dataset: str | None) -> list[str]:
    """Documents to calibrate on (None: the embedded corpus, training split only)."""
    from llmctl.eval.corpus import load_corpus_split

    check_dataset(dataset)
    if dataset is None:
        return list(load_corpus_split().train)
    path = Path(dataset).expanduser()
    if path.is_file() and path.suffix.lower() == ".json" and _is_title_map(path):
        # The embedded corpus format: keep its held-out split out of calibration.
        return list(load_corpus_split(path).train)
    texts = _load_with_datasets(path)
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ConfigError(f"dataset: {dataset} has no text", hint=f"one of the columns {_TEXT_COLUMNS}")
    return texts


def _is_title_map(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and all(isinstance(v, dict) and "extract" in v for v in list(data.values())[:5])


def _load_with_datasets(path: Path) -> list[str]:
    """Text of a local file, or of every data file under a local directory (one type)."""
    import datasets

    files = _data_files(path) if path.is_dir() else [path]
    kinds = {_LOADERS[f.suffix.lower()] for f in files}
    if len(kinds) > 1:
        raise ConfigError(f"dataset: {path} mixes file types ({', '.join(sorted(kinds))})",
                          hint="keep one type of data file in the directory")
    try:
        ds = datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train")
    except Exception as err:  # datasets raises many unrelated types for one cause: unreadable input
        raise ConfigError(f"dataset: cannot read {path}: {err}") from err
    column = next((c for c in _TEXT_COLUMNS if c in ds.column_names), None)
    if column is None:
        raise ConfigError(f"dataset: {path} has no text column", hint=f"name one of {_TEXT_COLUMNS}")
    return [str(t) for t in ds[column]]


def calibration_batch(tokenizer, texts: list[str], num_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """[num_samples, seq_len] token ids: documents in seeded random order, joined by blank
    lines into one stream, cut into consecutive windows (cycling if the data is short)."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    needed = num_samples * seq_len
    stream: list[int] = []
    position, batch = 0, 256
    while len(stream) < needed:
        if position >= len(order) and not stream:
            break
        chunk = [texts[order[(position + i) % len(order)]] for i in range(batch)]
        position += batch
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.extend(sep)
        if position >= 4 * len(order) and len(stream) < seq_len:
            break
    if len(stream) < seq_len:
        raise QuantizationError(f"calibration data has only {len(stream)} tokens, fewer than seq_len {seq_len}")
    return torch.tensor(stream[:needed], dtype=torch.long).reshape(num_samples, seq_len)
