"""Linear layers: split rules for tensor parallelism and weight loading into fused (packed) params."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmctl.config import GPTQConfig
from llmctl.errors import ConfigError, ModelLoadError
from llmctl.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from llmctl.layers.quantization import get_linear_method
from llmctl.layers.tensor_parallel import TensorParallel

GPTQ_CONFIG = GPTQConfig.from_dict({"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": True, "sym": True,
                                    "checkpoint_format": "gptq"})


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def test_column_parallel_ranks_concatenate_to_the_full_output() -> None:
    w, b, x = _rand(24, 16), _rand(24), _rand(5, 16)
    outs = []
    for rank in range(2):
        layer = ColumnParallelLinear(16, 24, bias=True, tp=TensorParallel(rank, 2))
        layer.weight_loader(layer.weight, w)
        layer.weight_loader(layer.bias, b)
        outs.append(layer(x))
    torch.testing.assert_close(torch.cat(outs, dim=-1), F.linear(x, w, b))


def test_row_parallel_ranks_sum_to_the_full_output() -> None:
    w, x = _rand(12, 32), _rand(5, 32)
    partial = []
    for rank in range(2):
        layer = RowParallelLinear(32, 12, tp=TensorParallel(rank, 2))
        layer.weight_loader(layer.weight, w)
        # The all-reduce needs a process group; the per-rank product is what it would sum.
        partial.append(layer.linear_method.apply(layer, x[:, rank * 16:(rank + 1) * 16]))
    torch.testing.assert_close(partial[0] + partial[1], F.linear(x, w), atol=1e-5, rtol=1e-5)


def test_qkv_shards_land_in_their_slices_per_rank() -> None:
    wq, wk, wv = _rand(32, 16), _rand(16, 16), _rand(16, 17)[:, :16]
    for rank in range(2):
        layer = QKVParallelLinear(16, head_dim=4, num_heads=8, num_kv_heads=4, tp=TensorParallel(rank, 2))
        for shard_id, w in zip("qkv", (wq, wk, wv)):
            layer.weight_loader(layer.weight, w, shard_id)
        expected = torch.cat([wq.chunk(2)[rank], wk.chunk(2)[rank], wv.chunk(2)[rank]])
        assert torch.equal(layer.weight, expected)
        assert (layer.num_heads, layer.num_kv_heads) == (4, 2)


def test_merged_gate_up_and_shape_errors() -> None:
    gate, up = _rand(20, 8), _rand(20, 9)[:, :8]
    layer = MergedColumnParallelLinear(8, [20, 20])
    layer.weight_loader(layer.weight, gate, 0)
    layer.weight_loader(layer.weight, up, 1)
    assert torch.equal(layer.weight, torch.cat([gate, up]))
    with pytest.raises(ModelLoadError, match=r"shard 1: shape \(21, 8\) does not match the expected \(20, 8\)"):
        layer.weight_loader(layer.weight, _rand(21, 8), 1)
    with pytest.raises(ModelLoadError, match=r"shard id must be 'q', 'k' or 'v'"):
        qkv = QKVParallelLinear(8, 2, 4, 2)
        qkv.weight_loader(qkv.weight, _rand(8, 8), "x")


def test_replicated_linear_is_plain() -> None:
    w, x = _rand(6, 4), _rand(3, 4)
    layer = ReplicatedLinear(4, 6)
    layer.weight_loader(layer.weight, w)
    torch.testing.assert_close(layer(x), x @ w.T)


def _packed_shard(k: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ints = lambda *shape: torch.randint(-2**31, 2**31 - 1, shape, generator=g, dtype=torch.int64).to(torch.int32)
    return {"qweight": ints(k // 8, n), "qzeros": ints(k // 16, n // 8),
            "scales": torch.rand(k // 16, n, generator=g).to(torch.float16), "g_idx": torch.arange(k, dtype=torch.int32).flip(0) // 16}


def test_packed_gptq_params_fuse_along_n_with_pack_factor() -> None:
    method = get_linear_method(GPTQ_CONFIG)
    layer = QKVParallelLinear(64, head_dim=8, num_heads=4, num_kv_heads=2, linear_method=method)
    shards = {"q": _packed_shard(64, 32, 1), "k": _packed_shard(64, 16, 2), "v": _packed_shard(64, 16, 3)}
    g_idx = shards["q"]["g_idx"]
    for shard_id, tensors in shards.items():
        for name, tensor in tensors.items():
            layer.weight_loader(getattr(layer, name), tensor, shard_id)
    # qweight [K/8, N] and scales [G, N] fuse along N as is; qzeros [G, N/8] at offsets divided by 8.
    for name in ("qweight", "qzeros", "scales"):
        assert torch.equal(getattr(layer, name), torch.cat([shards[s][name] for s in "qkv"], dim=1)), name
    assert layer.qzeros.shape == (4, 8)
    assert torch.equal(layer.g_idx, g_idx)


def test_unsharded_param_must_agree_across_shards() -> None:
    layer = MergedColumnParallelLinear(32, [16, 16], linear_method=get_linear_method(GPTQ_CONFIG))
    g_idx = torch.arange(32, dtype=torch.int32) // 16
    layer.weight_loader(layer.g_idx, g_idx, 0)
    with pytest.raises(ModelLoadError, match=r"shard 1 disagrees with shard 0"):
        layer.weight_loader(layer.g_idx, g_idx.flip(0), 1)


def test_linear_method_resolution() -> None:
    assert isinstance(get_linear_method(None), UnquantizedLinearMethod)
    assert type(get_linear_method(GPTQ_CONFIG)).__name__ == "GPTQLinearMethod"
    with pytest.raises(ConfigError, match=r"quantization method 'awq' is not supported"):
        GPTQConfig.from_dict({"quant_method": "awq"})
