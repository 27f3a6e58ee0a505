"""A model's architecture read from its config.json, without torch.

`llmctl plan` and the KV budget use it before any weight is loaded; the model
builder uses it to construct layers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmctl.config import GPTQConfig, gptq_config_from_json, read_gptq_config
from llmctl.errors import ConfigError, ModelLoadError

# HF architectures our Llama-family model implements.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class ModelArch:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    attention_bias: bool  # qkv bias (Qwen2)
    torch_dtype: str  # as saved: float32 | float16 | bfloat16
    sliding_window: int | None = None  # positions a token attends to, itself included
    sliding_window_layers: tuple[int, ...] = ()  # the layers that use it (the others attend to all)
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    quantization: GPTQConfig | None = field(default=None, compare=False)  # None: dense weights

    @property
    def is_gptq(self) -> bool:
        return self.quantization is not None

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES.get(self.torch_dtype, 2)

    def linear_shapes(self) -> tuple[tuple[str, int, int], ...]:
        """(checkpoint name, in_features K, out_features N) of one decoder layer's seven
        linears: the ones GPTQ quantizes, in the order it quantizes them."""
        d, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return (("q_proj", d, q), ("k_proj", d, kv), ("v_proj", d, kv), ("o_proj", q, d),
                ("gate_proj", d, i), ("up_proj", d, i), ("down_proj", i, d))

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d = self.hidden_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        linears = sum(k * n for _, k, n in self.linear_shapes())
        per_layer = linears + (q + 2 * kv if self.attention_bias else 0) + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embed + d

    def layer_sliding_window(self, layer: int) -> int | None:
        return self.sliding_window if layer in self.sliding_window_layers else None

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V, every layer: 2 x layers x kv_heads x head_dim x bytes."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes


def resolve_dtype(dtype: str, arch: ModelArch, device_kind: str) -> str:
    """The one meaning of a dtype setting: "auto" is float32 on the CPU (CPU half matmuls
    are slow and the embedded model ships in fp32) and the checkpoint's half dtype on a GPU;
    a name (or fp16/bf16/half/fp32) is that dtype."""
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name == "auto":
        if device_kind == "cpu":
            return "float32"
        return arch.torch_dtype if arch.torch_dtype in ("float16", "bfloat16") else "float16"
    if name not in DTYPE_BYTES:
        raise ConfigError(f"dtype: must be auto, float32, float16 or bfloat16, got {dtype!r}")
    return name


def read_config_json(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).exists():
        raise ModelLoadError(f"model path {model_dir} does not exist")
    if not Path(model_dir).is_dir():
        raise ModelLoadError(f"model path {model_dir} is not a directory", hint="pass a Hugging Face model directory")
    if not path.is_file():
        raise ModelLoadError(f"{model_dir} has no config.json", hint="a model dir needs config.json and *.safetensors")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{path} is not valid JSON: {err}") from err


def arch_from_config(cfg: dict[str, Any], source: str = "config.json") -> ModelArch:
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{source}: unsupported architecture {arch!r}",
            hint=f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}",
        )
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return ModelArch(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            rope_scaling=cfg.get("rope_scaling") or _rope_scaling_from_parameters(cfg.get("rope_parameters")),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16"),
            **_sliding_window(cfg, arch, int(cfg["num_hidden_layers"])),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos_ids,
            quantization=(gptq_config_from_json(cfg["quantization_config"], f"{source}: quantization_config")
                          if cfg.get("quantization_config") else None),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ModelLoadError(f"{source}: missing or invalid field {err}") from err


def _sliding_window(cfg: dict[str, Any], arch: str, num_layers: int) -> dict[str, Any]:
    """As transformers reads it: Mistral windows every layer when `sliding_window` is set;
    Qwen2 only with `use_sliding_window`, in the layers `layer_types` marks (or else the
    layers from `max_window_layers` on); Llama never."""
    window = cfg.get("sliding_window")
    if arch == "LlamaForCausalLM" or window is None:
        return {}
    if arch == "Qwen2ForCausalLM" and not cfg.get("use_sliding_window", False):
        return {}
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"sliding_window {window!r}: must be a positive number of tokens")
    layers = range(num_layers)
    if arch == "Qwen2ForCausalLM":
        types = cfg.get("layer_types")
        if types:
            layers = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
        else:
            layers = range(int(cfg.get("max_window_layers", 28)), num_layers)
    return {"sliding_window": window, "sliding_window_layers": tuple(layers)}


def _rope_scaling_from_parameters(params: dict[str, Any] | None) -> dict[str, Any] | None:
    """transformers 5 writes `rope_parameters`; only a non-default rope type is scaling."""
    if not params or params.get("rope_type", "default") == "default":
        return None
    return {k: v for k, v in params.items() if k != "rope_theta"}


def load_arch(model_dir: Path) -> ModelArch:
    """The architecture of a model dir, with its GPTQ config wherever the dir keeps it."""
    arch = arch_from_config(read_config_json(model_dir), source=str(Path(model_dir) / "config.json"))
    if arch.quantization is None:
        arch = replace(arch, quantization=read_gptq_config(model_dir))
    return arch
