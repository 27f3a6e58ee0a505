"""`llmctl models`: the embedded default model and its cache, or what a local model dir holds.

Reads config.json and file sizes only; no weight is loaded and torch is not imported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from llmctl.units import format_bytes

EXAMPLES = (
    "llmctl models",
    "llmctl models ./smollm2-gptq --json",
    "llmctl models --convert",
)


def models(
    model: Annotated[Optional[str], typer.Argument(metavar="[MODEL]", help="A local Hugging Face model dir; omit (or 'default') for the embedded model.")] = None,
    convert: Annotated[bool, typer.Option("--convert", help="Convert the embedded model now if it is not yet (about 30 s, once).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the description as JSON.")] = False,
) -> None:
    if model is None or model.strip().lower() == "default":
        if convert:
            resolve_model_with_spinner("default")
        info = describe_default_model()
    else:
        from llmctl.models.loader import resolve_model_path

        info = describe_model_dir(resolve_model_path(model))
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        _print_info(info)


def resolve_model_with_spinner(model: str | None) -> Path:
    """`resolve_model_path` for the CLI: a spinner on stderr while the default model converts."""
    from rich.console import Console

    from llmctl.models.default import is_default_model_converted
    from llmctl.models.loader import resolve_model_path

    if model not in (None, "default") or is_default_model_converted():
        return resolve_model_path(model)
    console = Console(stderr=True)
    with console.status("preparing the embedded default model") as status:
        return resolve_model_path(model, progress=lambda msg: status.update(msg))


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def describe_default_model() -> dict[str, Any]:
    from llmctl.models.default import DEFAULT_MODEL_NAME, default_model_dir, is_default_model_converted
    from llmctl.paths import default_model_gguf

    gguf = default_model_gguf()
    cache_dir = default_model_dir()
    converted = is_default_model_converted()
    return {
        "name": DEFAULT_MODEL_NAME,
        "source_gguf": str(gguf),
        "source_gguf_bytes": gguf.stat().st_size if gguf.is_file() else None,
        "cache_dir": str(cache_dir),
        "converted": converted,
        "size_bytes": _dir_size(cache_dir) if converted else None,
        "model": describe_model_dir(cache_dir) if converted else None,
    }


def describe_model_dir(model_dir: Path) -> dict[str, Any]:
    from llmctl.models.arch import load_arch

    arch = load_arch(model_dir)
    weights = sorted(model_dir.glob("*.safetensors"))
    q = arch.quantization
    gptq = None
    if q is not None:
        gptq = {"quant_method": "gptq", "bits": q.bits, "group_size": q.group_size, "desc_act": q.desc_act,
                "sym": q.sym, "checkpoint_format": q.checkpoint_format}
    return {
        "path": str(model_dir),
        "architecture": arch.architecture,
        "num_hidden_layers": arch.num_hidden_layers,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_key_value_heads,
        "head_dim": arch.head_dim,
        "vocab_size": arch.vocab_size,
        "max_position_embeddings": arch.max_position_embeddings,
        "rope_scaling": arch.rope_scaling,
        "num_params": arch.num_params(),
        "dtype": arch.torch_dtype,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "weight_files": [w.name for w in weights],
        "weights_bytes": sum(w.stat().st_size for w in weights),
        "size_bytes": _dir_size(model_dir),
        "quantization": gptq,
    }


def _human_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _model_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    q = info["quantization"]
    quant = "none" if q is None else (
        f"{q['quant_method']} {q['bits']}-bit, group size {q['group_size']}, desc_act={q['desc_act']}, "
        f"sym={q['sym']}, format {q['checkpoint_format']}"
    )
    return [
        ("architecture", info["architecture"]),
        ("layers", str(info["num_hidden_layers"])),
        ("hidden / intermediate", f"{info['hidden_size']} / {info['intermediate_size']}"),
        ("heads / kv heads / head dim", f"{info['num_attention_heads']} / {info['num_key_value_heads']} / {info['head_dim']}"),
        ("vocab", str(info["vocab_size"])),
        ("context length", str(info["max_position_embeddings"]) + (f" (rope {info['rope_scaling'].get('rope_type', info['rope_scaling'].get('type'))})" if info["rope_scaling"] else "")),
        ("parameters", _human_count(info["num_params"]) + (" (tied embeddings)" if info["tie_word_embeddings"] else "")),
        ("dtype", info["dtype"]),
        ("quantization", quant),
        ("weights", f"{len(info['weight_files'])} safetensors file(s), {format_bytes(info['weights_bytes'])}"),
        ("size on disk", format_bytes(info["size_bytes"])),
    ]


def _print_info(info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    if "source_gguf" in info:
        table.title = f"default model: {info['name']}"
        table.add_row("source", f"{info['source_gguf']} ({format_bytes(info['source_gguf_bytes'])})")
        table.add_row("cache", info["cache_dir"])
        table.add_row("converted", "yes" if info["converted"] else "no (converts on first use, or run `llmctl models --convert`)")
        table.add_row("size on disk", format_bytes(info["size_bytes"]))
        rows = _model_rows(info["model"])[:-1] if info["model"] else []
    else:
        table.title = info["path"]
        rows = _model_rows(info)
    for key, value in rows:
        table.add_row(key, value)
    Console(highlight=False).print(table)
