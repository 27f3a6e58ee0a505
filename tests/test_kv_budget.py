"""KV budget arithmetic, checked by hand on Llama-3-8B and Llama-3-70B shapes."""

import pytest

from llmctl.config import CacheConfig, ModelConfig, ParallelConfig, SchedulerConfig
from llmctl.engine.kv_budget import GiB, gptq_weight_bytes, plan_kv, weight_bytes
from llmctl.errors import CacheCapacityError
from llmctl.models.arch import arch_from_config

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 8192,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
LLAMA3_70B = {**LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64}


def _plan(cfg=LLAMA3_8B, *, device="gpu", tp=1, gpu_memory=80 * GiB, kv_cache_memory=None, activation=None,
          max_model_len=8192, dtype="float16", **model):
    return plan_kv(arch_from_config(cfg), "m", ModelConfig(dtype=dtype, max_model_len=max_model_len, **model),
                   CacheConfig(kv_cache_memory=kv_cache_memory), SchedulerConfig(),
                   ParallelConfig(tensor_parallel_size=tp), device=device, gpu_memory=gpu_memory,
                   measured_activation_bytes=activation)


def test_llama3_8b_sizes_by_hand():
    arch = arch_from_config(LLAMA3_8B)
    assert arch.kv_bytes_per_token(2) == 2 * 32 * 8 * 128 * 2 == 131_072
    per_layer = 4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336 + 2 * 4096
    params = 32 * per_layer + 2 * 128256 * 4096 + 4096
    assert arch.num_params() == params == 8_030_261_248
    assert weight_bytes(arch, 2) == 2 * params
    # GPTQ 4-bit g128: linears at half a byte per weight plus, per 128 input rows and
    # per output column, an fp16 scale (2 bytes) and a 4-bit zero (half a byte).
    linears = [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336), (4096, 14336), (14336, 4096)]
    linear_params = 32 * sum(k * n for k, n in linears)
    packed = 32 * sum(k * n // 2 + (k // 128) * n * 2 + (k // 128) * n // 2 for k, n in linears)
    assert gptq_weight_bytes(arch, 4, 128) == (params - linear_params) * 2 + packed
    assert 5.6e9 < gptq_weight_bytes(arch, 4, 128) < 5.8e9  # published GPTQ 8B checkpoints: ~5.7 GB


# The CUDA graphs' pools at the default 128 sequences and 2,048 batched tokens, by hand: the
# largest decode (128 tokens) and prefill (2,048) forwards' per-token intermediates, 131,072 bytes
# each, and fp32 logits [b, V] of every graph: decode buckets 1, 2, 4, 8, 16 ... 128 (591 rows),
# prefill 12 token buckets (16 ... 512, 768 ... 2,048) x sequence buckets 1, 2, 4, 8 (15 rows).
GRAPHS_8B = (128 + 2048) * 131_072 + (591 + 12 * 15) * 128_256 * 4


def test_gpu_budget_is_memory_times_utilization_minus_weights_activation_and_graphs():
    plan = _plan(activation=1 * GiB)
    assert plan.graph_bytes == GRAPHS_8B == 680_754_176
    budget = int(80 * GiB * 0.9) - 8_030_261_248 * 2 - 1 * GiB - GRAPHS_8B
    assert plan.kv_cache_bytes == budget
    assert plan.block_bytes == 16 * 131_072
    assert plan.num_blocks == budget // (16 * 131_072) == 28_369
    assert plan.num_tokens == 28_369 * 16
    assert plan.max_concurrency == pytest.approx(28_369 / 512)
    assert plan.tp_verdict == "fits"
    assert ("CUDA graphs (estimated)", "649.2 MiB") in plan.rows()


def test_graph_memory_follows_enforce_eager_and_the_prefill_graph_limit():
    assert _plan(activation=1 * GiB, enforce_eager=True).graph_bytes == 0
    assert _plan(device="cpu", kv_cache_memory=GiB).graph_bytes == 0
    decode_only = 128 * 131_072 + 591 * 128_256 * 4
    assert _plan(activation=1 * GiB, max_prefill_graph_tokens=0).graph_bytes == decode_only
    # up to 512 tokens: 6 token buckets
    assert _plan(activation=1 * GiB, max_prefill_graph_tokens=512).graph_bytes == (
        decode_only + 512 * 131_072 + 6 * 15 * 128_256 * 4)
    eager = _plan(activation=1 * GiB, enforce_eager=True)
    assert eager.num_blocks - _plan(activation=1 * GiB).num_blocks == 324  # 649 MiB of 2 MiB blocks, rounded


def test_fixed_kv_budget_gives_exact_blocks_and_concurrency():
    plan = _plan(kv_cache_memory=16 * GiB)
    assert plan.num_blocks == 16 * GiB // (2 << 20) == 8192
    assert plan.num_tokens == 131_072
    assert plan.max_concurrency == 16.0


def test_tensor_parallel_on_a_model_that_fits_is_wasteful():
    plan = _plan(tp=2, activation=1 * GiB)
    assert plan.tp_verdict == "wasteful"
    assert plan.kv_bytes_per_token_rank == 65_536
    # Each rank keeps half the weights (norms whole) and half the KV heads.
    assert plan.kv_cache_bytes == int(80 * GiB * 0.9) - 8_030_527_488 - 1 * GiB - GRAPHS_8B


def test_tensor_parallel_needed_when_weights_do_not_fit():
    one = _plan(LLAMA3_70B, tp=1)
    assert one.tp_verdict == "needed" and "--tensor-parallel-size 2" in one.tp_advice
    assert _plan(LLAMA3_70B, tp=2).tp_verdict == "justified"
    with pytest.raises(CacheCapacityError):
        one.check_fits()  # 141 GB of weights leave no KV budget on one 80 GiB card


def test_not_even_one_sequence_fits_says_what_to_change():
    plan = _plan(device="cpu", kv_cache_memory=100 << 20, max_model_len=8192)
    with pytest.raises(CacheCapacityError) as err:
        plan.check_fits()
    tokens = (100 << 20) // (16 * 131_072) * 16
    assert f"holds {tokens:,} tokens" in str(err.value)
    assert f"--max-model-len to {tokens}" in err.value.hint
    _plan(device="cpu", kv_cache_memory=100 << 20, max_model_len=tokens).check_fits()


def test_cpu_default_budget_and_auto_dtype():
    plan = _plan(device="cpu", dtype="auto")
    assert plan.dtype == "float32"
    assert plan.kv_bytes_per_token == 2 * 131_072
    assert plan.kv_cache_bytes == 1 * GiB
    assert plan.num_blocks == GiB // (16 * 2 * 131_072)
