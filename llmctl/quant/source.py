"""The tensors of the source model that stay unquantized (embeddings, norms, biases, lm_head)."""

from __future__ import annotations

import re
from pathlib import Path

_QUANTIZED_WEIGHT = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def is_quantized_weight(name: str) -> bool:
    return bool(_QUANTIZED_WEIGHT.match(name))


def unquantized_dtype(cfg: dict) -> str:
    """bf16 models keep bf16 (fp16 could overflow their range); everything else goes to fp16."""
    source = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16")
    return "bfloat16" if source == "bfloat16" else "float16"


def copy_unquantized_tensors(model_dir: Path, writer) -> int:
    """Add every tensor that GPTQ leaves alone to `writer`, floats in `unquantized_dtype`. Returns the count."""
    import json

    import torch

    from llmctl.models.loader import iterate_weights, weight_files

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    tied_embeddings = bool(cfg.get("tie_word_embeddings", False))
    dtype = getattr(torch, unquantized_dtype(cfg))
    count = 0
    for name, tensor, _ in iterate_weights(weight_files(Path(model_dir))):
        if is_quantized_weight(name) or name.endswith(_SKIPPED_SUFFIXES):
            continue
        if name == "lm_head.weight" and tied_embeddings:
            continue
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        writer.add({name: tensor})
        count += 1
    return count
