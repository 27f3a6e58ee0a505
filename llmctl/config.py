"""Configuration: one frozen dataclass per concern, validated on construction.

Recipes (YAML) are loaded into these in `llmctl.recipe`; `llmctl.settings` merges flags
over a recipe over these defaults. Nothing here imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.errors import ConfigError, ModelLoadError


def _check(cond: bool, name: str, why: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {why}")


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and in what dtype. `model="default"` is the embedded SmolLM2."""

    model: str = "default"
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_model_len: int | None = None  # None: the model's own context length
    seed: int = 0
    # Only with load_format="dummy": random GPTQ 4-bit weights (group 128) instead of dense ones.
    # A real checkpoint's quantization is read from its config.json.
    quantization: str | None = None  # None | gptq
    enforce_eager: bool = False  # True: never replay CUDA graphs (decode and prefill steps)
    # Steps of up to this many tokens (from up to 8 sequences) replay a prefill CUDA graph; the
    # graphs' memory pool grows with it (llmctl.engine.prefill_graph; the KV plan counts it,
    # kv_budget.estimate_graph_bytes). 0: prefill runs eagerly.
    max_prefill_graph_tokens: int = 2048
    # Inline architecture (config.json fields, a recipe's `model.arch`): plans and random
    # weights (load_format="dummy") of a model whose files are not here.
    arch: dict[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _check(self.dtype in ("auto", "float32", "float16", "bfloat16"), "dtype",
               f"must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        _check(self.quantization in (None, "gptq"), "quantization", f"must be gptq or unset, got {self.quantization!r}")
        _check(self.max_model_len is None or self.max_model_len > 0, "max_model_len", "must be positive")
        _check(self.max_prefill_graph_tokens >= 0, "max_prefill_graph_tokens", "must be 0 or more")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: block size and the memory it may take."""

    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | None = None  # bytes; the budget on the CPU (or a fixed budget on GPU)
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None

    def __post_init__(self) -> None:
        _check(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size",
               f"must be a power of two in 1..128, got {self.block_size}")
        _check(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
               f"must be in (0, 1], got {self.gpu_memory_utilization}")
        _check(self.kv_cache_memory is None or self.kv_cache_memory > 0, "kv_cache_memory", "must be positive")
        _check(self.num_gpu_blocks_override is None or self.num_gpu_blocks_override > 0,
               "num_gpu_blocks_override", "must be positive")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits, under vLLM's names."""

    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    max_waiting: int = 4096  # past this the server answers 503

    def __post_init__(self) -> None:
        _check(self.max_num_seqs > 0, "max_num_seqs", "must be positive")
        _check(self.max_num_batched_tokens > 0, "max_num_batched_tokens", "must be positive")
        _check(self.max_waiting > 0, "max_waiting", "must be positive")


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """KV heads each tensor-parallel rank holds: its share, or one replica when there are fewer
    KV heads than ranks (vLLM's rule; a rank's KV cache holds only these)."""
    return max(1, num_kv_heads // tp_size)


def vocab_rows_per_rank(vocab_size: int, tp_size: int) -> int:
    """Rows of the embedding and the LM head per tensor-parallel rank: equal pieces, the last padded."""
    return -(-vocab_size // tp_size)


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        _check(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")


GPTQ_FORMATS = ("gptq", "gptq_v2")
GPTQ_CONFIG_FILE = "quantize_config.json"
# The accuracy check `llmctl quantize` stores beside a checkpoint (and `serve` reports).
EVAL_FILE = "llmctl_eval.json"


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ settings, named and serialized as AutoGPTQ/GPTQModel write them into
    quantize_config.json and config.json's `quantization_config`. The one GPTQ config:
    the quantizer runs it, the checkpoint writer writes it, `read_gptq_config` reads it
    back, the GPTQ linear method and the KV planner take it."""

    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    damp_percent: float = 0.01
    true_sequential: bool = True
    static_groups: bool = False
    # GPTQModel's default ordering: groups by decreasing max H diagonal, columns inside a
    # group likewise; groups stay contiguous, so no g_idx cost at inference. Act-order
    # (desc_act) replaces it, so it reads False whenever desc_act is set.
    act_group_aware: bool = True
    lm_head: bool = False
    # gptq (v1) stores zero - 1, gptq_v2 the zero itself. The quantizer picks it from `sym`.
    checkpoint_format: str = "gptq"

    def __post_init__(self) -> None:
        _check(self.bits in (2, 3, 4, 8), "bits", f"must be 2, 3, 4 or 8, got {self.bits}")
        _check(self.group_size == -1 or self.group_size in (16, 32, 64, 128, 256, 512, 1024), "group_size",
               f"must be -1 or a power of two in 16..1024, got {self.group_size}")
        _check(0.0 < self.damp_percent < 1.0, "damp_percent", f"must be in (0, 1), got {self.damp_percent}")
        _check(self.checkpoint_format in GPTQ_FORMATS, "checkpoint_format",
               f"must be gptq (v1) or gptq_v2, got {self.checkpoint_format!r}")
        if self.desc_act and self.act_group_aware:
            object.__setattr__(self, "act_group_aware", False)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def zero_offset(self) -> int:
        """What a stored zero lacks: 1 in format gptq (v1), 0 in gptq_v2."""
        return 1 if self.checkpoint_format == "gptq" else 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTQConfig:
        """From quantize_config.json or config.json's `quantization_config`. GPTQModel keeps
        some fields under `meta`; a missing `act_group_aware` means a quantizer that had none."""
        method = str(d.get("quant_method") or "gptq").lower()
        if method != "gptq":
            raise ConfigError(f"quantization method {method!r} is not supported",
                              hint="llmctl loads dense (fp32/fp16/bf16) and GPTQ checkpoints")
        meta = d.get("meta") or {}

        def get(key: str, default: Any) -> Any:
            value = d.get(key, meta.get(key))
            return default if value is None else value

        try:
            return cls(
                bits=int(get("bits", 4)), group_size=int(get("group_size", 128)), desc_act=bool(get("desc_act", False)),
                sym=bool(get("sym", True)), damp_percent=float(get("damp_percent", 0.01)),
                true_sequential=bool(get("true_sequential", True)), static_groups=bool(get("static_groups", False)),
                act_group_aware=bool(get("act_group_aware", False)), lm_head=bool(get("lm_head", False)),
                checkpoint_format=str(d.get("checkpoint_format") or d.get("format") or "gptq").lower())
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:
            raise ConfigError(f"quantization_config: invalid value ({err})") from err

    def to_dict(self) -> dict[str, Any]:
        """What goes into quantize_config.json and config.json's `quantization_config`."""
        from llmctl.version import __version__

        return {
            "bits": self.bits, "group_size": self.group_size, "desc_act": self.desc_act, "sym": self.sym,
            "lm_head": self.lm_head, "quant_method": "gptq", "checkpoint_format": self.checkpoint_format,
            "pack_dtype": "int32", "damp_percent": self.damp_percent, "true_sequential": self.true_sequential,
            "static_groups": self.static_groups,
            "meta": {"quantizer": [f"llmctl:{__version__}"], "act_group_aware": self.act_group_aware,
                     "damp_percent": self.damp_percent, "true_sequential": self.true_sequential,
                     "static_groups": self.static_groups},
        }


def read_gptq_config(model_dir: str | Path) -> GPTQConfig | None:
    """The GPTQ config of a model dir, or None for a dense model: config.json's
    `quantization_config` (what transformers and vLLM read) first, else quantize_config.json
    (AutoGPTQ's file). A quantization method other than GPTQ is a `ModelLoadError`."""
    model_dir = Path(model_dir)
    for path, key in ((model_dir / "config.json", "quantization_config"), (model_dir / GPTQ_CONFIG_FILE, None)):
        if not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ModelLoadError(f"{path} is not valid JSON: {err}") from err
        raw = raw.get(key) if key and isinstance(raw, dict) else raw
        if raw:
            return gptq_config_from_json(raw, str(path))
    return None


def gptq_config_from_json(raw: Any, source: str) -> GPTQConfig:
    """`GPTQConfig.from_dict` for a checkpoint's file: a bad value is a `ModelLoadError` naming it."""
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{source}: the quantization config is not a mapping")
    try:
        return GPTQConfig.from_dict(raw)
    except ConfigError as err:
        raise ModelLoadError(f"{source}: {err}", hint=err.hint) from None


@dataclass(frozen=True)
class QuantConfig:
    """A `llmctl quantize` run: the GPTQ settings it writes, and its calibration data."""

    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    dataset: str | None = None  # None: the embedded Wikipedia corpus (training split)
    num_samples: int = 128
    seq_len: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.num_samples > 0, "num_samples", "must be positive")
        _check(self.seq_len > 0, "seq_len", "must be positive")


@dataclass(frozen=True)
class EvalConfig:
    """What `llmctl eval` measures and the gate it enforces (the gate's thresholds apply to a
    candidate compared with a baseline; None turns a check off)."""

    num_windows: int = 16
    window_len: int = 1024
    stride: int | None = None  # None: window_len (non-overlapping windows)
    dataset: str | None = None  # None: the embedded corpus's held-out split
    max_ppl_increase: float | None = 0.05  # relative: 0.05 = the candidate may be 5% worse
    min_top1_agreement: float | None = 0.9  # share of tokens whose argmax matches the baseline's
    max_kld: float | None = None  # mean KL(baseline || candidate) per token, nats
    min_recovery: float | None = None  # candidate accuracy / baseline accuracy, each accuracy task
    kld_top_k: int = 256  # baseline log-probs kept per token for KLD (the rest is one tail bucket); 0: whole rows as 16-bit codes
    tasks: tuple[str, ...] = ()
    num_fewshot: int = 0
    limit: int | None = None

    def __post_init__(self) -> None:
        _check(self.num_windows > 0, "num_windows", "must be positive")
        _check(self.window_len > 1, "window_len", "must be > 1")
        _check(self.stride is None or 0 < self.stride <= self.window_len, "stride",
               f"must be in [1, window_len={self.window_len}]")
        _check(self.max_ppl_increase is None or self.max_ppl_increase >= 0, "max_ppl_increase", "must be >= 0")
        _check(self.min_top1_agreement is None or 0.0 <= self.min_top1_agreement <= 1.0, "min_top1_agreement",
               "must be in [0, 1]")
        _check(self.max_kld is None or self.max_kld >= 0, "max_kld", "must be >= 0")
        _check(self.min_recovery is None or self.min_recovery >= 0, "min_recovery", "must be >= 0")
        _check(self.kld_top_k >= 0, "kld_top_k", "must be 0 (whole rows as 16-bit codes) or a positive K")
        _check(self.num_fewshot >= 0, "num_fewshot", "must be >= 0")
        _check(self.limit is None or self.limit > 0, "limit", "must be positive")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    api_key: str | None = None
    max_request_bytes: int = 4 * 1024 * 1024
    shutdown_grace_s: float = 10.0
    chat_template: str | None = None  # a Jinja file that replaces the model's chat template
    request_body_timeout_s: float = 30.0  # a request body must arrive within this (408 after)

    def __post_init__(self) -> None:
        _check(0 <= self.port < 65536, "port", f"must be in 0..65535, got {self.port}")
        _check(self.api_key is None or bool(self.api_key.strip()), "api_key", "must not be empty (unset it for no key)")
        _check(self.max_request_bytes > 0, "max_request_bytes", "must be positive")
        _check(self.shutdown_grace_s >= 0, "shutdown_grace_s", "must not be negative")
        _check(self.request_body_timeout_s > 0, "request_body_timeout_s", "must be positive")


@dataclass(frozen=True)
class BenchConfig:
    num_prompts: int = 64
    input_len: int = 128
    output_len: int = 128
    n: int = 1
    dataset: str = "random"  # random | corpus
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.num_prompts > 0, "num_prompts", "must be positive")
        _check(self.input_len > 0, "input_len", "must be positive")
        _check(self.output_len > 0, "output_len", "must be positive")
        _check(self.n > 0, "n", "must be positive")
        _check(self.dataset in ("random", "corpus"), "dataset", f"must be random or corpus, got {self.dataset!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs, built once by the CLI or the offline API."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
