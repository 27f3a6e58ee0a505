"""The embedded Wikipedia corpus and its one fixed split.

Articles are sorted by key; the last `NUM_HELDOUT_ARTICLES` are held out for
evaluation and everything before them is the training split. Calibration reads
only the training split, so a quantized model is never scored on text it was
fitted to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from llmctl.errors import AssetError

NUM_HELDOUT_ARTICLES = 1000
ARTICLE_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class CorpusSplit:
    train: tuple[str, ...]
    heldout: tuple[str, ...]

    def heldout_text(self) -> str:
        """The held-out articles joined by blank lines (the perplexity protocol)."""
        return ARTICLE_SEPARATOR.join(self.heldout)

    def train_text(self) -> str:
        return ARTICLE_SEPARATOR.join(self.train)


def _read_articles(path: Path) -> list[str]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise AssetError(f"corpus file {path} does not exist") from err
    except json.JSONDecodeError as err:
        raise AssetError(f"corpus file {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise AssetError(f"corpus file {path}: expected an object of {{title: {{'extract': text}}}}")
    texts = []
    for key in sorted(data):
        entry = data[key]
        text = entry.get("extract", "") if isinstance(entry, dict) else str(entry)
        texts.append(text.strip())
    return texts


@lru_cache(maxsize=4)
def _split_cached(path: str, num_heldout: int) -> CorpusSplit:
    texts = _read_articles(Path(path))
    if len(texts) <= num_heldout:
        raise AssetError(f"corpus {path} has {len(texts)} articles; need more than {num_heldout} to hold some out")
    # Empty extracts still count as articles so the split boundary depends only on keys.
    train = tuple(t for t in texts[:-num_heldout] if t)
    heldout = tuple(t for t in texts[-num_heldout:] if t)
    return CorpusSplit(train=train, heldout=heldout)


def load_corpus_split(path: str | Path | None = None, num_heldout: int = NUM_HELDOUT_ARTICLES) -> CorpusSplit:
    """The train/held-out split of a `{key: {"extract": text}}` corpus (default: the embedded one)."""
    if path is None:
        from llmctl.paths import wiki_corpus_json

        path = wiki_corpus_json()
    return _split_cached(str(Path(path).resolve()), num_heldout)
