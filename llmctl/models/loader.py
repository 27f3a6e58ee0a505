"""Model resolution and loading: a model argument -> a local HF dir -> our model with its weights.

Only safetensors are read (single file or sharded with an index); pickle never is.
Every failure is a `ModelLoadError` naming the path and what is wrong with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from llmctl.errors import ConfigError, ModelLoadError
from llmctl.models.arch import load_arch, resolve_dtype

if TYPE_CHECKING:
    import torch

    from llmctl.layers.tensor_parallel import TensorParallel
    from llmctl.models.default import ProgressCallback
    from llmctl.models.llama import LlamaForCausalLM

INDEX_FILE = "model.safetensors.index.json"
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# Tensors some checkpoints carry that we recompute instead of loading.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def resolve_model_path(model: str | None, progress: ProgressCallback | None = None) -> Path:
    """`default` or None: the embedded SmolLM2 (converted on first use); else a local dir."""
    if model is None or model.strip().lower() == "default":
        from llmctl.models.default import ensure_default_model

        return ensure_default_model(progress)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path {model} does not exist",
            hint="pass a local Hugging Face model dir (no hub downloads) or `default` for the embedded SmolLM2",
        )
    if not path.is_dir():
        raise ModelLoadError(f"model path {model} is not a directory", hint="pass a Hugging Face model dir")
    return path


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files to read: those of the index, else model.safetensors, else every *.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({err})") from err
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise ModelLoadError(
                f"{index} lists shard(s) that are missing: {', '.join(missing)}",
                hint="the download or copy is incomplete",
            )
        return [model_dir / f for f in files]
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    files = sorted(p for p in model_dir.glob("*.safetensors") if not p.name.startswith("consolidated"))
    if files:
        return files
    pickles = sorted(p.name for pattern in _PICKLE_PATTERNS for p in model_dir.glob(pattern))
    if pickles:
        raise ModelLoadError(
            f"{model_dir} has only pickle weights ({', '.join(pickles[:3])}); llmctl loads safetensors only and never unpickles",
            hint="convert once with transformers: model.save_pretrained(dir, safe_serialization=True)",
        )
    raise ModelLoadError(f"{model_dir} has no weight files (*.safetensors)")


class CheckpointSlice:
    """A tensor of an open safetensors file, read only when `materialize` is called and then
    only the part `narrow` kept: a tensor-parallel rank reads its shard, never the whole."""

    def __init__(self, source: Any, shape: tuple[int, ...], index: tuple[slice, ...] | None = None) -> None:
        self._source = source  # safetensors' lazy slice (get_slice)
        self.shape = shape
        self._index = index or tuple(slice(0, n) for n in shape)

    def narrow(self, dim: int, start: int, length: int) -> CheckpointSlice:
        if not 0 <= start <= start + length <= self.shape[dim]:
            raise ModelLoadError(f"rows {start}..{start + length} of dim {dim} are outside shape {self.shape}")
        index = list(self._index)
        index[dim] = slice(index[dim].start + start, index[dim].start + start + length)
        shape = list(self.shape)
        shape[dim] = length
        return CheckpointSlice(self._source, tuple(shape), tuple(index))

    def materialize(self) -> torch.Tensor:
        if not self.shape:
            return self._source[:]
        return self._source[self._index]


def iterate_weights(files: list[Path], lazy: bool = False) -> Iterator[tuple[str, Any, Path]]:
    """(tensor name, CPU tensor, file) for every tensor of every file; with `lazy`, a
    `CheckpointSlice` instead of the tensor (valid while the iteration is on that file)."""
    from safetensors import SafetensorError, safe_open

    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if lazy:
                        source = f.get_slice(name)
                        yield name, CheckpointSlice(source, tuple(source.get_shape())), path
                    else:
                        yield name, f.get_tensor(name), path
        except SafetensorError as err:
            raise ModelLoadError(
                f"{path} is not a readable safetensors file ({err})", hint="the file may be truncated or corrupt"
            ) from err


def _expected_tensors(model: LlamaForCausalLM) -> dict[str, tuple[str, Any]]:
    """Checkpoint tensor name -> (our parameter name, shard id) for every parameter to fill."""
    expected: dict[str, tuple[str, Any]] = {}
    for name, _ in model.named_parameters():  # tied lm_head is a duplicate and drops out
        for ours, theirs, shard_id in model.stacked_params_mapping:
            if f".{ours}." in name:
                for ours2, theirs2, shard2 in model.stacked_params_mapping:
                    if ours2 == ours:
                        expected[name.replace(f".{ours}.", f".{theirs2}.")] = (name, shard2)
                break
        else:
            expected[name] = (name, None)
    return expected


def load_weights(model: LlamaForCausalLM, files: list[Path]) -> None:
    """Fill every parameter of `model` from `files`; strict both ways (nothing missing, nothing unknown)."""
    fill_parameters(model, iterate_weights(files, lazy=True), files[0].parent)


def fill_parameters(model: LlamaForCausalLM, tensors: Iterable[tuple[str, Any, Any]], source: Any) -> None:
    """Fill every parameter of `model` from (checkpoint name, tensor, where it came from)
    triples, e.g. a transformers model's state dict; strict both ways, errors naming `source`."""
    params = dict(model.named_parameters())
    expected = _expected_tensors(model)
    loaded: set[str] = set()
    unexpected: list[str] = []
    for name, tensor, path in tensors:
        if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and model.arch.tie_word_embeddings):
            continue
        if name not in expected:
            unexpected.append(name)
            continue
        param_name, shard_id = expected[name]
        param = params[param_name]
        loader = getattr(param, "weight_loader", None)
        try:
            if loader is None:
                from llmctl.layers.linear import copy_checked

                copy_checked(param.data, tensor, "weight")
            else:
                loader(param, tensor, shard_id)
        except ModelLoadError as err:
            raise ModelLoadError(f"{path}: tensor {name}: {err}", hint="the checkpoint does not match its config.json") from err
        loaded.add(name)
    _check_complete(source, expected, loaded, unexpected, params)


def _check_complete(model_dir: Any, expected: dict, loaded: set[str], unexpected: list[str], params: dict) -> None:
    missing = [n for n in expected if n not in loaded and not getattr(params[expected[n][0]], "ignore_missing", False)]
    if missing:
        raise ModelLoadError(
            f"{model_dir}: {len(missing)} tensor(s) missing from the checkpoint: {', '.join(sorted(missing)[:5])}",
            hint="the checkpoint is incomplete or does not match its config.json",
        )
    if unexpected:
        raise ModelLoadError(
            f"{model_dir}: {len(unexpected)} tensor(s) the model has no place for: {', '.join(sorted(unexpected)[:5])}",
            hint="the checkpoint does not match its config.json (or uses an unsupported layout)",
        )


def resolve_device(device: str) -> torch.device:
    """"auto" is CUDA where there is one, else the CPU; a CUDA device that is not here is an error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"device: {device!r} is not a device ({err})") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} asked for, but CUDA is not available here", hint="use --device cpu")
    return dev


def load_model(model_dir: Path | str, dtype: str | torch.dtype | None = None, device: str = "cpu",
               tp: TensorParallel | None = None) -> LlamaForCausalLM:
    """Build our model for a local HF dir and load its safetensors weights (dense or GPTQ);
    under tensor parallelism, this rank's shard of them (read from the files alone).
    `dtype` None keeps the checkpoint's own dtype; a name (or "auto") means what it means
    everywhere (`llmctl.models.arch.resolve_dtype`)."""
    import torch

    from llmctl.models.llama import LlamaForCausalLM

    model_dir = Path(model_dir)
    arch = load_arch(model_dir)
    files = weight_files(model_dir)
    dev = resolve_device(device)
    if isinstance(dtype, torch.dtype):
        torch_dtype = dtype
    else:
        torch_dtype = getattr(torch, resolve_dtype(arch.torch_dtype if dtype is None else dtype, arch, dev.type))
    with torch.device(dev):
        model = LlamaForCausalLM(arch, dtype=torch_dtype, tp=tp)
    load_weights(model, files)
    for module in model.modules():
        hook = getattr(module, "process_weights_after_loading", None)
        if callable(hook):
            hook()
    return model.eval()


def load_tokenizer(model_dir: Path | str) -> Any:
    """The model's tokenizer (with its chat template), from local files only."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"{model_dir}: cannot load the tokenizer ({err})", hint="a model dir needs tokenizer.json or its tokenizer files") from err
