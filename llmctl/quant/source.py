"""The tensors of the source model that stay unquantized (embeddings, norms, biases, lm_head)."""

from __future__ import annotations

import re
from pathlib import Path

_QUANTIZED_WEIGHT = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def is_quantized_weight(name: str) -> bool:
    return bool(_QUANTIZED_WEIGHT.match(name))


def copy_unquantized_tensors(model_dir: Path, writer, tied_embeddings: bool | None = None) -> int:
    """Add every tensor that GPTQ leaves alone to `writer`, floats as fp16. Returns the count."""
    import json

    import torch

    from llmctl.models.loader import iterate_weights, weight_files

    if tied_embeddings is None:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        tied_embeddings = bool(cfg.get("tie_word_embeddings", False))
    count = 0
    for name, tensor, _ in iterate_weights(weight_files(Path(model_dir))):
        if is_quantized_weight(name) or name.endswith(_SKIPPED_SUFFIXES):
            continue
        if name == "lm_head.weight" and tied_embeddings:
            continue
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float16)
        writer.add({name: tensor})
        count += 1
    return count
