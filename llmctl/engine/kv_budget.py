"""The KV budget: how many cache blocks a memory budget buys, and what that means for
concurrency and tensor parallelism. Pure arithmetic on a `ModelArch`; no torch, so
`llmctl plan` answers before any weight is read.

    GPU budget  = gpu_memory x gpu_memory_utilization - weights/TP - activation peak - CUDA graphs
    CPU budget  = CacheConfig.kv_cache_memory (DEFAULT_CPU_KV_CACHE_MEMORY when unset)
    num_blocks  = budget // (block_size x kv_bytes_per_token / TP)

`plan` and the engine's start-up table share `KVPlan.rows()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmctl.config import kv_heads_per_rank, vocab_rows_per_rank
from llmctl.errors import CacheCapacityError
from llmctl.models.arch import DTYPE_BYTES, ModelArch, resolve_dtype
from llmctl.units import format_bytes

GiB = 1 << 30
# On the CPU the cache lives in RAM next to everything else; 1 GiB holds ~23k tokens of
# the default model in fp32 (46 KiB/token), far more than a 2-core CPU can keep busy.
DEFAULT_CPU_KV_CACHE_MEMORY = 1 * GiB

def dtype_bytes(dtype: str, arch: ModelArch | None = None) -> int:
    """Bytes per element of `dtype`; "auto" means the checkpoint's own dtype."""
    if dtype == "auto":
        return arch.dtype_bytes if arch is not None else 2
    return DTYPE_BYTES[dtype]


def weight_bytes(arch: ModelArch, bytes_per_param: int = 2) -> int:
    """Every parameter at `bytes_per_param` (tied embeddings counted once)."""
    return arch.num_params() * bytes_per_param


def gptq_weight_bytes(arch: ModelArch, bits: int = 4, group_size: int = 128) -> int:
    """A GPTQ checkpoint: each linear [K, N] stores K*N*bits/8 of packed weights plus, per
    group of `group_size` input rows and per output column, an fp16 scale and a packed
    `bits`-bit zero. Embeddings, lm_head and norms stay fp16."""
    linear_params, quantized = 0, 0
    for _, k, n in arch.linear_shapes():
        groups = math.ceil(k / group_size) if group_size > 0 else 1
        linear_params += k * n * arch.num_hidden_layers
        quantized += (k * n * bits // 8 + groups * n * 2 + groups * n * bits // 8) * arch.num_hidden_layers
    return (arch.num_params() - linear_params) * 2 + quantized


def estimate_activation_bytes(arch: ModelArch, max_num_batched_tokens: int, max_num_seqs: int,
                              bytes_per_param: int = 2) -> int:
    """A planning estimate of one forward's activation peak (the engine measures it
    instead): the widest per-token intermediates of one layer for every batched token,
    plus fp32 logits for every sequence that samples."""
    return max_num_batched_tokens * _activation_per_token(arch, bytes_per_param) + max_num_seqs * arch.vocab_size * 4


def _activation_per_token(arch: ModelArch, bytes_per_param: int) -> int:
    """The widest per-token intermediates of one layer."""
    d, i = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    return (4 * d + q + 2 * kv + 3 * i) * bytes_per_param


def estimate_graph_bytes(arch: ModelArch, model_config, scheduler_config, bytes_per_param: int = 2) -> int:
    """A planning estimate of the CUDA graphs' private memory pools, which the engine captures
    after the KV cache is allocated (outside the activation profile): each graph keeps its fp32
    logits [sequences, V]; the pool's other memory is the activations of its largest forward
    (captured first; the smaller ones reuse it). 0 with enforce_eager. The engine prints the pools
    it measured at start."""
    from llmctl.engine.graph_buckets import capture_sizes, prefill_capture_sizes

    if model_config.enforce_eager:
        return 0
    per_token, row = _activation_per_token(arch, bytes_per_param), arch.vocab_size * 4
    decode = capture_sizes(scheduler_config.max_num_seqs)
    total = decode[-1] * per_token + sum(decode) * row
    tokens, seqs = prefill_capture_sizes(scheduler_config.max_num_batched_tokens, scheduler_config.max_num_seqs,
                                         model_config.max_prefill_graph_tokens)
    if tokens:
        total += tokens[-1] * per_token + len(tokens) * sum(seqs) * row
    return total


@dataclass(frozen=True)
class KVPlan:
    """The numbers of one plan. Bytes are per GPU unless named total."""

    model: str
    dtype: str
    device: str  # "gpu" | "cpu"
    num_params: int
    weight_bytes_fp16: int
    weight_bytes_gptq4: int
    weight_bytes_loaded: int  # what this run loads (total, all ranks)
    weight_format: str  # how they are held: "float16", "GPTQ 4-bit g64", "GPTQ 4-bit g64 -> float32 (CPU)"
    weight_bytes_rank: int  # the parameters one rank holds (its shard; replicas and padding counted)
    kv_bytes_per_token: int  # whole model, all ranks
    kv_bytes_per_token_rank: int  # what one GPU stores per token
    block_size: int
    tensor_parallel_size: int
    memory_total: int | None  # per GPU; None on CPU
    gpu_memory_utilization: float
    activation_bytes: int  # per GPU
    activation_measured: bool
    graph_bytes: int  # per GPU: the CUDA graphs' pools (estimated; 0 on the CPU and with enforce_eager)
    kv_cache_bytes: int  # per GPU (or the CPU budget)
    num_blocks: int
    max_model_len: int
    tp_verdict: str  # "fits" | "needed" | "wasteful" | "justified" | "n/a"
    tp_advice: str

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.kv_bytes_per_token_rank

    @property
    def kv_cache_bytes_allocated(self) -> int:
        """What each rank's KV cache tensor takes: whole blocks of the budget."""
        return self.num_blocks * self.block_bytes

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def blocks_per_seq(self) -> int:
        return math.ceil(self.max_model_len / self.block_size)

    @property
    def max_concurrency(self) -> float:
        """Sequences of max_model_len tokens the cache holds at once."""
        return self.num_blocks / self.blocks_per_seq

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs: the table `llmctl plan` and the engine start-up print."""
        gpu = self.device == "gpu"
        rows = [
            ("model", self.model),
            ("parameters", f"{self.num_params / 1e9:.2f} B"),
            ("weights fp16", format_bytes(self.weight_bytes_fp16)),
            ("weights GPTQ 4-bit (g128)", format_bytes(self.weight_bytes_gptq4)),
            (f"weights loaded ({self.weight_format})", format_bytes(self.weight_bytes_loaded)),
            *([("weights per rank", format_bytes(self.weight_bytes_rank))] if self.tensor_parallel_size > 1 else []),
            ("KV bytes per token", f"{self.kv_bytes_per_token:,}"),
            ("block size (tokens)", str(self.block_size)),
        ]
        if gpu:
            rows += [
                ("GPU memory x utilization", f"{format_bytes(self.memory_total or 0)} x {self.gpu_memory_utilization}"),
                ("tensor parallel size", str(self.tensor_parallel_size)),
                ("activation peak" + (" (measured)" if self.activation_measured else " (estimated)"),
                 format_bytes(self.activation_bytes)),
                ("CUDA graphs (estimated)", format_bytes(self.graph_bytes)),
            ]
        rows += [
            ("KV cache" + (" per GPU" if gpu else " (CPU budget)"), format_bytes(self.kv_cache_bytes)),
            ("KV blocks" + (" per rank" if self.tensor_parallel_size > 1 else ""), f"{self.num_blocks:,}"),
            *([("KV cache allocated per rank", format_bytes(self.kv_cache_bytes_allocated))]
              if self.tensor_parallel_size > 1 else []),
            ("tokens that fit", f"{self.num_tokens:,}"),
            (f"max concurrency at {self.max_model_len:,} tokens", f"{self.max_concurrency:.2f}x"),
        ]
        if gpu:
            rows.append(("tensor parallelism", f"{self.tp_verdict}: {self.tp_advice}"))
        return rows

    def format_text(self) -> str:
        width = max(len(k) for k, _ in self.rows())
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in self.rows())

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out.update(block_bytes=self.block_bytes, num_tokens=self.num_tokens,
                   kv_cache_bytes_allocated=self.kv_cache_bytes_allocated,
                   max_concurrency=self.max_concurrency)
        return out

    def check_fits(self) -> None:
        """Raise CacheCapacityError unless one sequence of max_model_len fits."""
        if self.num_blocks >= self.blocks_per_seq:
            return
        fits = self.num_tokens
        hints = [f"lower --max-model-len to {fits}" if fits > 0 else "free memory for the cache"]
        if self.device == "gpu":
            hints += ["raise --gpu-memory-utilization", "raise --tensor-parallel-size",
                      "load a GPTQ 4-bit checkpoint"]
        else:
            hints.append("raise --kv-cache-memory")
        raise CacheCapacityError(
            f"the KV cache holds {fits:,} tokens ({self.num_blocks} blocks of {self.block_size}, "
            f"{format_bytes(self.kv_cache_bytes)}) but one sequence of max_model_len={self.max_model_len:,} "
            f"needs {self.blocks_per_seq} blocks ({format_bytes(self.blocks_per_seq * self.block_bytes)})",
            hint="; or ".join(hints),
        )


def _kv_bytes_per_token_per_rank(arch: ModelArch, nbytes: int, tp: int) -> int:
    # Past tp == num_kv_heads each rank keeps a replica of one KV head (as vLLM does).
    heads = kv_heads_per_rank(arch.num_key_value_heads, tp)
    return 2 * arch.num_hidden_layers * heads * arch.head_dim * nbytes


def _gptq_linear_bytes(k: int, n: int, k_full: int, bits: int, gs: int, desc_act: bool) -> int:
    """One rank's GPTQ tensors of a [k, n] shard of a linear whose whole K is k_full (the
    rules of GPTQLinearMethod.create_weights: act-order or one group keeps groups whole)."""
    if k != k_full and (desc_act or gs <= 0):
        groups = -(-k_full // gs) if gs > 0 else 1
    else:
        groups = k // gs if gs > 0 else 1
    return k * bits // 32 * n * 4 + groups * n * bits // 32 * 4 + groups * n * 2 + k * 4


def rank_weight_bytes(arch: ModelArch, nbytes: int, tp: int = 1, dequantized: bool = False) -> int:
    """The parameter bytes one tensor-parallel rank allocates (what `load_model` gives it):
    column-parallel qkv (KV heads replicated past their count) and gate_up, row-parallel o
    and down, vocabulary rows padded to equal shares, norms on every rank. GPTQ linears are
    counted as the checkpoint stores them (on CUDA the kernels' repacking may differ), or as
    the dense weights the CPU dequantizes them into (`dequantized`)."""
    d, i, dh, layers = arch.hidden_size, arch.intermediate_size, arch.head_dim, arch.num_hidden_layers
    q_heads, kv_heads = arch.num_attention_heads // tp, kv_heads_per_rank(arch.num_key_value_heads, tp)
    vocab = vocab_rows_per_rank(arch.vocab_size, tp) * d * (1 if arch.tie_word_embeddings else 2)
    qkv_n = (q_heads + 2 * kv_heads) * dh
    biases = qkv_n if arch.attention_bias else 0
    if arch.attention_bias and arch.architecture != "Qwen2ForCausalLM" and tp == 1:
        biases += d  # o_proj's bias (refused at tp > 1)
    # (K this rank, N this rank, K whole) of qkv, o, gate_up, down
    linears = [(d, qkv_n, d), (q_heads * dh, d, arch.num_attention_heads * dh), (d, 2 * i // tp, d), (i // tp, d, i)]
    if arch.is_gptq and not dequantized:
        q = arch.quantization
        per_layer = sum(_gptq_linear_bytes(k, n, kf, q.bits, q.group_size, q.desc_act) for k, n, kf in linears)
        per_layer += (2 * d + biases) * nbytes
    else:
        per_layer = (sum(k * n for k, n, _ in linears) + 2 * d + biases) * nbytes
    return layers * per_layer + (vocab + d) * nbytes


def _loaded_weights(arch: ModelArch, dtype: str, device: str) -> tuple[int, str]:
    """(bytes, format) of the weights as the engine holds them. On the CPU a GPTQ model is
    dequantized once at load into the compute dtype: the dense size, not the 4-bit one."""
    if not arch.is_gptq:
        return weight_bytes(arch, DTYPE_BYTES[dtype]), dtype
    bits, group = arch.quantization.bits, arch.quantization.group_size
    name = f"GPTQ {bits}-bit g{group}"
    if device == "cpu":
        return weight_bytes(arch, DTYPE_BYTES[dtype]), f"{name} -> {dtype} at load (CPU)"
    return gptq_weight_bytes(arch, bits, group), name


def _tp_verdict(usable: int, weights: int, activation: int, seq_kv: int, tp: int) -> tuple[str, str]:
    """Is tensor parallelism needed (weights don't fit one GPU) or wasteful (they fit with
    room, so TP only adds an all-reduce per layer where replicas would scale instead)?"""
    def fits(t: int) -> bool:
        return weights / t + activation + seq_kv / t <= usable

    min_tp = next((t for t in (1, 2, 4, 8, 16, 32, 64) if fits(t)), None)
    if min_tp is None:
        return "needed", "weights do not fit even on 64 GPUs"
    if tp < min_tp:
        return "needed", f"weights + one sequence need --tensor-parallel-size {min_tp}"
    cost = "every step pays two all-reduces per layer (after attention and after the MLP)"
    if tp > 1 and weights <= usable / 2:
        return "wasteful", (f"fits on one GPU with room (weights {weights / usable:.0%} of it) and {cost}: "
                            f"run {tp} replicas of --tensor-parallel-size 1 instead")
    if tp > 1:
        return "justified", f"one GPU would leave too little room for the KV cache (min {min_tp}); {cost}"
    return "fits", "one GPU is enough"


def plan_kv(arch: ModelArch, model: str, model_config, cache_config, scheduler_config, parallel_config, *,
            device: str, gpu_memory: int | None = None, measured_weight_bytes: int | None = None,
            measured_activation_bytes: int | None = None) -> KVPlan:
    """The KV plan for `arch` under the given configs (llmctl.config dataclasses).

    device "gpu": budget = gpu_memory x utilization - weights/TP - activation peak (the
    measured numbers when the engine has them, else estimates). device "cpu": budget =
    cache_config.kv_cache_memory or DEFAULT_CPU_KV_CACHE_MEMORY.
    """
    dtype = resolve_dtype(model_config.dtype, arch, device)
    nbytes = DTYPE_BYTES[dtype]
    tp = parallel_config.tensor_parallel_size
    max_model_len = model_config.max_model_len or arch.max_position_embeddings
    weights, weight_format = _loaded_weights(arch, dtype, device)
    kv_rank = _kv_bytes_per_token_per_rank(arch, nbytes, tp)
    block_bytes = cache_config.block_size * kv_rank
    activation = measured_activation_bytes
    if activation is None:
        activation = estimate_activation_bytes(arch, scheduler_config.max_num_batched_tokens,
                                               scheduler_config.max_num_seqs, nbytes)
    verdict, advice, graphs = "n/a", "CPU", 0
    if device == "gpu":
        graphs = estimate_graph_bytes(arch, model_config, scheduler_config, nbytes)
        if gpu_memory is None:
            raise ValueError("plan_kv: gpu_memory is required for device='gpu'")
        usable = int(gpu_memory * cache_config.gpu_memory_utilization)
        per_rank_weights = measured_weight_bytes
        if per_rank_weights is None:
            per_rank_weights = weights if tp == 1 else rank_weight_bytes(arch, nbytes, tp)
        budget = cache_config.kv_cache_memory or max(0, usable - per_rank_weights - activation - graphs)
        seq_kv = math.ceil(max_model_len / cache_config.block_size) * cache_config.block_size * kv_rank * tp
        verdict, advice = _tp_verdict(usable, weights, activation + graphs, seq_kv, tp)
    else:
        budget = cache_config.kv_cache_memory or DEFAULT_CPU_KV_CACHE_MEMORY
    num_blocks = cache_config.num_gpu_blocks_override or budget // block_bytes
    return KVPlan(
        model=model, dtype=dtype, device=device, num_params=arch.num_params(),
        weight_bytes_fp16=weight_bytes(arch, 2), weight_bytes_gptq4=gptq_weight_bytes(arch, 4, 128),
        weight_bytes_loaded=weights, weight_format=weight_format,
        weight_bytes_rank=rank_weight_bytes(arch, nbytes, tp, dequantized=device == "cpu"), kv_bytes_per_token=arch.kv_bytes_per_token(nbytes),
        kv_bytes_per_token_rank=kv_rank,
        block_size=cache_config.block_size, tensor_parallel_size=tp,
        memory_total=gpu_memory if device == "gpu" else None,
        gpu_memory_utilization=cache_config.gpu_memory_utilization,
        activation_bytes=activation, activation_measured=measured_activation_bytes is not None, graph_bytes=graphs,
        kv_cache_bytes=budget, num_blocks=num_blocks, max_model_len=max_model_len,
        tp_verdict=verdict, tp_advice=advice,
    )
