"""GPTQ checkpoint directories: `quantize_config.json`, config.json, sharded safetensors.

The quantization config is `llmctl.config.GPTQConfig` (read back with
`llmctl.config.read_gptq_config`). `CheckpointWriter` streams tensors into shards
inside a temp dir next to the destination and renames it into place at the end, so
an interrupted run leaves no half checkpoint; the source model is only read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from llmctl.config import EVAL_FILE, GPTQ_CONFIG_FILE, GPTQConfig, read_gptq_config
from llmctl.errors import ModelLoadError, QuantizationError

# Files of a HF model dir worth carrying over besides config.json and the weights.
_COPY_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken", ".py")
_NEVER_COPY = {"config.json", GPTQ_CONFIG_FILE, "model.safetensors.index.json", EVAL_FILE}
DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3


def _safetensors_save(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


class CheckpointWriter:
    """Writes one checkpoint dir atomically. Use as a context manager.

    Tensors added with `add` are flushed to `model-0000i.safetensors` shards whenever
    the buffer passes `max_shard_bytes`; `commit` writes the index (or renames a single
    shard to `model.safetensors`), the configs, copies the tokenizer files and renames
    the temp dir onto `out_dir`. Leaving the block without `commit` deletes the temp dir.
    """

    def __init__(self, out_dir: str | Path, overwrite: bool = False,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        self.out_dir = Path(out_dir).resolve()
        check_output_dir(self.out_dir, overwrite)
        self.overwrite = overwrite
        self.max_shard_bytes = max_shard_bytes
        self.tmp_dir: Path | None = None
        self._buffer: dict = {}
        self._buffer_bytes = 0
        self._weight_map: dict[str, str] = {}
        self._shards: list[str] = []
        self.total_bytes = 0

    def __enter__(self) -> "CheckpointWriter":
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=self.out_dir.parent))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp_dir is not None and self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def add(self, tensors: dict) -> None:
        for name, t in tensors.items():
            if name in self._weight_map or name in self._buffer:
                raise QuantizationError(f"tensor {name} written twice")
            # A copy: split fused results share storage (g_idx), which safetensors refuses.
            self._buffer[name] = t.detach().cpu().clone().contiguous()
            self._buffer_bytes += t.numel() * t.element_size()
        if self._buffer_bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        name = f"model-{len(self._shards) + 1:05d}.safetensors"
        _safetensors_save(self._buffer, self.tmp_dir / name)
        self._weight_map.update({k: name for k in self._buffer})
        self._shards.append(name)
        self.total_bytes += self._buffer_bytes
        self._buffer, self._buffer_bytes = {}, 0

    def commit(self, source_dir: str | Path, config: dict[str, Any], qconfig: GPTQConfig,
               extra_files: dict[str, Any] | None = None) -> Path:
        """Finish the checkpoint and move it to `out_dir`; returns `out_dir`."""
        self._flush()
        tmp = self.tmp_dir
        if len(self._shards) == 1:
            (tmp / self._shards[0]).rename(tmp / "model.safetensors")
        else:
            names = [f"model-{i + 1:05d}-of-{len(self._shards):05d}.safetensors" for i in range(len(self._shards))]
            renamed = dict(zip(self._shards, names))
            for old, new in renamed.items():
                (tmp / old).rename(tmp / new)
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {k: renamed[v] for k, v in sorted(self._weight_map.items())}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        copy_tokenizer_files(Path(source_dir), tmp)
        from llmctl.quant.source import unquantized_dtype

        dtype = unquantized_dtype(config)
        config = dict(config, quantization_config=qconfig.to_dict(), torch_dtype=dtype)
        if "dtype" in config:  # transformers 5 writes and prefers this key
            config["dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / GPTQ_CONFIG_FILE).write_text(json.dumps(qconfig.to_dict(), indent=2))
        for name, payload in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(payload, indent=2))
        _apply_umask(tmp)
        return self._move_into_place()

    def _move_into_place(self) -> Path:
        old = None
        if self.out_dir.exists():
            if not self.overwrite:
                raise QuantizationError(f"output dir {self.out_dir} appeared while quantizing; not replacing it")
            check_output_dir(self.out_dir, overwrite=True)  # it may have changed while quantizing
            old = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.old-", dir=self.out_dir.parent))
            os.replace(self.out_dir, old / "x")
        os.replace(self.tmp_dir, self.out_dir)
        self.tmp_dir = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out_dir


def _apply_umask(tmp: Path) -> None:
    """mkdtemp makes 0700 and safetensors writes 0600: give the finished checkpoint the
    modes any other file of the user gets (0755/0644 under the usual umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    for path in tmp.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def is_checkpoint_dir(path: Path) -> bool:
    """A directory `--overwrite` may replace: a GPTQ checkpoint (llmctl's or another quantizer's)."""
    try:
        return read_gptq_config(path) is not None
    except (OSError, ValueError, ModelLoadError):
        return False


def check_output_dir(out_dir: Path, overwrite: bool, source_dir: Path | None = None) -> None:
    """Refuse any output that would put a user's files at risk, before any work is done.

    The output may not be the source, lie inside it or contain it; an existing output is
    replaced only with `overwrite`, and only when it is empty or a GPTQ checkpoint, so a
    mistyped `-o` can never delete a model, a home directory or a project.
    """
    out_dir = out_dir.resolve()
    if source_dir is not None:
        src = Path(source_dir).resolve()
        if out_dir == src:
            raise QuantizationError(f"output dir {out_dir} is the source model dir",
                                    hint="write the checkpoint to a new directory; the source is never modified")
        if src in out_dir.parents:
            raise QuantizationError(f"output dir {out_dir} is inside the source model dir {src}",
                                    hint="write the checkpoint somewhere else; the source is never modified")
        if out_dir in src.parents:
            raise QuantizationError(f"output dir {out_dir} contains the source model dir {src}",
                                    hint="name a new directory, e.g. -o " + str(out_dir / f"{src.name}-gptq"))
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise QuantizationError(f"output path {out_dir} exists and is not a directory")
    if not overwrite:
        raise QuantizationError(f"output dir {out_dir} already exists", hint="pass --overwrite to replace it")
    if any(out_dir.iterdir()) and not is_checkpoint_dir(out_dir):
        raise QuantizationError(f"output dir {out_dir} is not a GPTQ checkpoint; --overwrite replaces only "
                                "a checkpoint or an empty dir", hint="name a new directory")


def copy_tokenizer_files(source_dir: Path, dest_dir: Path) -> None:
    for path in sorted(source_dir.iterdir()):
        if path.is_file() and path.suffix in _COPY_SUFFIXES and path.name not in _NEVER_COPY:
            shutil.copyfile(path, dest_dir / path.name)
