"""Configuration: one frozen dataclass per concern, validated on construction.

Recipes (YAML) are loaded into these in `llmctl.recipe`. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmctl.errors import ConfigError


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
    enforce_eager: bool = False  # True: never replay CUDA graphs for decode steps

    def __post_init__(self) -> None:
        _check(self.dtype in ("auto", "float32", "float16", "bfloat16"), "dtype",
               f"must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        _check(self.quantization in (None, "gptq"), "quantization", f"must be gptq or unset, got {self.quantization!r}")
        _check(self.max_model_len is None or self.max_model_len > 0, "max_model_len", "must be positive")


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


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        _check(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")


@dataclass(frozen=True)
class QuantConfig:
    """GPTQ settings, as AutoGPTQ/GPTQModel name them in quantize_config.json."""

    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    damp_percent: float = 0.01
    true_sequential: bool = True
    static_groups: bool = False
    # GPTQModel's default ordering: groups by decreasing max H diagonal, columns inside a
    # group likewise; groups stay contiguous, so no g_idx cost at inference.
    act_group_aware: bool = True
    lm_head: bool = False
    dataset: str | None = None  # None: the embedded Wikipedia corpus (training split)
    num_samples: int = 128
    seq_len: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.bits in (2, 3, 4, 8), "bits", f"must be 2, 3, 4 or 8, got {self.bits}")
        _check(self.group_size == -1 or self.group_size in (16, 32, 64, 128, 256, 512, 1024), "group_size",
               f"must be -1 or a power of two in 16..1024, got {self.group_size}")
        _check(0.0 < self.damp_percent < 1.0, "damp_percent", f"must be in (0, 1), got {self.damp_percent}")
        _check(self.num_samples > 0, "num_samples", "must be positive")
        _check(self.seq_len > 0, "seq_len", "must be positive")


@dataclass(frozen=True)
class EvalConfig:
    """What `llmctl eval` measures and the gate it enforces."""

    num_windows: int = 16
    window_len: int = 1024
    max_ppl_increase: float = 0.05  # relative: 0.05 = quantized may be 5% worse
    min_top1_agreement: float = 0.9
    tasks: tuple[str, ...] = ()
    num_fewshot: int = 0
    limit: int | None = None

    def __post_init__(self) -> None:
        _check(self.num_windows > 0, "num_windows", "must be positive")
        _check(self.window_len > 1, "window_len", "must be > 1")
        _check(self.max_ppl_increase >= 0, "max_ppl_increase", "must be >= 0")
        _check(0.0 <= self.min_top1_agreement <= 1.0, "min_top1_agreement", "must be in [0, 1]")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    api_key: str | None = None
    max_request_bytes: int = 4 * 1024 * 1024
    shutdown_grace_s: float = 10.0

    def __post_init__(self) -> None:
        _check(0 <= self.port < 65536, "port", f"must be in 0..65535, got {self.port}")
        _check(self.api_key is None or bool(self.api_key.strip()), "api_key", "must not be empty (unset it for no key)")
        _check(self.max_request_bytes > 0, "max_request_bytes", "must be positive")


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
