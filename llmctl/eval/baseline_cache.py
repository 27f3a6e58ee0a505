"""The baseline's per-token rows on disk, so five candidates against one baseline run it once.

Key: sha256 of the baseline's weights (content of its safetensors files and config.json),
its tokenizer files, the windows (token ids and scored ranges), K, dtype and device kind.
Stored as safetensors (never pickle) under `$LLMCTL_HOME/eval-cache/`: per scored token the
correct token's log-prob (fp32), the top-K log-probs (fp32) and ids (int32), 8K + 4 bytes a
token: 33 MB for 16 windows of 1,024 tokens at K = 256; K = 0 keeps the whole row as 16-bit
codes (llmctl.eval.kld.pack_rows) with its maximum and argmax instead, 2V + 12 bytes a token.
Read back, the rows are bit-identical
to a fresh run's, so cached and fresh comparisons give the same numbers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "tokenizer.model")
FORMAT_VERSION = 2  # 2: whole rows as 16-bit codes


def _hash_file(h, path: Path) -> None:
    h.update(path.name.encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)


def weights_digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    files = sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json"]
    for path in files:
        if path.is_file():
            _hash_file(h, path)
    return h.hexdigest()


def tokenizer_digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        if (model_dir / name).is_file():
            _hash_file(h, model_dir / name)
    return h.hexdigest()


def cache_key(model_dir: Path, windows_digest: str, top_k: int, dtype: str, device_kind: str) -> dict:
    return {"format": FORMAT_VERSION, "weights": weights_digest(model_dir), "tokenizer": tokenizer_digest(model_dir),
            "windows": windows_digest, "top_k": top_k, "dtype": dtype, "device": device_kind}


def cache_path(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir / f"baseline-{digest}.safetensors"


def load(path: Path) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception:  # a torn or foreign file: recompute rather than fail
        return None


def save(path: Path, rows: dict[str, torch.Tensor], key: dict) -> None:
    """Atomic: a reader never sees half a file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous().cpu() for k, v in rows.items()}, str(tmp),
              metadata={"key": json.dumps(key, sort_keys=True)})
    tmp.replace(path)
