"""The text eval scores and the windows it is cut into.

Text: the embedded corpus's held-out split (blank-line joined) by default, or a local file:
plain text, JSONL with a text field, parquet, or a `datasets` directory (`save_to_disk`);
never the Hub. Windows: `window_len` tokens every `stride` tokens (sliding windows as
transformers' perplexity guide describes them); a window scores only the tokens the previous
one did not reach, so each token of the stream is scored at most once, with up to
`window_len - stride` tokens of context carried over.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from llmctl.errors import ConfigError
from llmctl.eval.jsonl import read_jsonl

TEXT_FIELDS = ("text", "content", "extract", "document", "sentence")


@dataclass(frozen=True)
class Windows:
    ids: torch.Tensor  # [W, L] token ids
    score_from: tuple[int, ...]  # per window: first position whose token is scored
    source: str  # what the text was

    @property
    def num_scored(self) -> int:
        return sum(self.ids.shape[1] - s for s in self.score_from)

    def digest(self) -> str:
        """sha256 of the token ids and the scored ranges: the same windows give the same digest."""
        h = hashlib.sha256()
        h.update(json.dumps([list(self.ids.shape), list(self.score_from)]).encode())
        h.update(self.ids.to(torch.int64).numpy().tobytes())
        return h.hexdigest()


def sliding_windows(token_ids: torch.Tensor, window_len: int, stride: int | None, num_windows: int | None,
                    source: str = "") -> Windows:
    """token_ids: [T]. num_windows None: as many as fit."""
    stride = stride or window_len
    if window_len < 2:
        raise ConfigError(f"window_len: must be at least 2, got {window_len}")
    if not 0 < stride <= window_len:
        raise ConfigError(f"stride: must be in [1, window_len={window_len}], got {stride}")
    total = token_ids.numel()
    fit = 0 if total < window_len else (total - window_len) // stride + 1
    count = fit if num_windows is None else num_windows
    if count < 1 or count > fit:
        need = window_len + (max(count, 1) - 1) * stride
        raise ConfigError(f"dataset: {source or 'the text'} has {total} tokens; {max(count, 1)} window(s) of "
                          f"{window_len} every {stride} need {need}",
                          hint="use a longer text, or fewer or shorter windows (--num-windows, --window-len)")
    ids = torch.stack([token_ids[i * stride:i * stride + window_len] for i in range(count)])
    score_from = tuple(1 if i == 0 else max(1, window_len - stride) for i in range(count))
    return Windows(ids=ids, score_from=score_from, source=source)


def load_eval_text(dataset: str | None) -> tuple[str, str]:
    """(text, what it is). None: the embedded held-out split."""
    if dataset is None:
        from llmctl.eval.corpus import load_corpus_split

        return load_corpus_split().heldout_text(), "embedded corpus, held-out split"
    path = Path(dataset).expanduser()
    if not path.exists():
        raise ConfigError(f"dataset: {path} does not exist",
                          hint="a local .txt, .jsonl, .parquet file or a `datasets` directory (never the Hub)")
    if path.is_dir():
        texts = _datasets_dir_texts(path)
    elif path.suffix.lower() == ".jsonl":
        texts = _jsonl_texts(path)
    elif path.suffix.lower() == ".parquet":
        texts = _parquet_texts(path)
    elif path.suffix.lower() in (".txt", ".md", ""):
        return path.read_text(encoding="utf-8"), str(path)
    else:
        raise ConfigError(f"dataset: {path} has an unsupported extension",
                          hint="use .txt, .jsonl, .parquet or a `datasets` directory")
    texts = [t.strip() for t in texts if t and t.strip()]
    if not texts:
        raise ConfigError(f"dataset: {path} has no text", hint=f"a field named one of {', '.join(TEXT_FIELDS)}")
    return "\n\n".join(texts), str(path)


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for number, row in read_jsonl(path, "dataset"):
        field = next((f for f in TEXT_FIELDS if f in row), None)
        if field is None:
            raise ConfigError(f"dataset: {path} line {number} has no text field",
                              hint=f"name it one of {', '.join(TEXT_FIELDS)}")
        texts.append(str(row[field]))
    return texts


def _column(names: list[str], path: Path) -> str:
    field = next((f for f in TEXT_FIELDS if f in names), None)
    if field is None:
        raise ConfigError(f"dataset: {path} has no text column (columns: {', '.join(names)})",
                          hint=f"name one of {', '.join(TEXT_FIELDS)}")
    return field


def _optional(module: str, path: Path, reads: str):
    """`module`, imported, or a ConfigError saying which package reads this kind of dataset."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"dataset: reading {path} ({reads}) needs the {module.split('.')[0]} package, "
                          f"which is not installed ({err})",
                          hint="pip install datasets (it brings pyarrow), or pass a .txt or .jsonl file") from err


def _parquet_texts(path: Path) -> list[str]:
    pq = _optional("pyarrow.parquet", path, "parquet")
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for one cause: not a parquet file
        raise ConfigError(f"dataset: cannot read {path} as parquet: {err}") from err
    return [str(t) for t in table.column(_column(table.column_names, path)).to_pylist()]


def _datasets_dir_texts(path: Path) -> list[str]:
    datasets = _optional("datasets", path, "a `datasets` directory")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises many unrelated types for one cause: unreadable input
        raise ConfigError(f"dataset: cannot load {path} with datasets.load_from_disk: {err}") from err
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["test"] if "test" in ds else ds[next(iter(ds))]
    return [str(t) for t in ds[_column(ds.column_names, path)]]


def eval_windows(tokenizer, dataset: str | None, window_len: int, stride: int | None,
                 num_windows: int | None) -> Windows:
    text, source = load_eval_text(dataset)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return sliding_windows(ids, window_len, stride, num_windows, source)
