"""Calibration data for GPTQ: texts from a local file (through `datasets`), a hub dataset
when online, or the embedded corpus's training split, cut into seeded token windows.
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
    """Fail early on a dataset argument that names a missing or unreadable local file."""
    if dataset is None:
        return
    path = Path(dataset).expanduser()
    if path.exists():
        if path.is_file() and path.suffix.lower() not in _LOADERS:
            raise ConfigError(f"dataset: {path} has an unsupported extension",
                              hint=f"use one of {', '.join(sorted(_LOADERS))}")
        return
    # Anything else that looks like a path is a missing file; the rest are hub names.
    if path.suffix.lower() in _LOADERS or dataset.startswith((".", "/", "~")):
        raise ConfigError(f"dataset: file {path} does not exist")


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
    texts = _load_with_datasets(path if path.exists() else None, dataset)
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


def _load_with_datasets(path: Path | None, name: str) -> list[str]:
    import datasets

    try:
        if path is None:
            ds = datasets.load_dataset(name, split="train")
        elif path.is_dir():
            ds = datasets.load_dataset(str(path), split="train")
        else:
            ds = datasets.load_dataset(_LOADERS[path.suffix.lower()], data_files=str(path), split="train")
    except Exception as err:  # datasets raises many unrelated types for one cause: unreadable input
        raise ConfigError(f"dataset: cannot load {name}: {err}") from err
    column = next((c for c in _TEXT_COLUMNS if c in ds.column_names), None)
    if column is None:
        raise ConfigError(f"dataset: {name} has no text column", hint=f"name one of {_TEXT_COLUMNS}")
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
