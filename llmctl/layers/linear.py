"""Linear layers behind one interface, so a GPTQ linear replaces a dense one (vLLM-style).

A layer owns the sharding rules (which slice of a checkpoint tensor lands where);
a *linear method* owns the parameters and the matmul. The model only ever builds
layers; the checkpoint format decides the method.

Contract a quant method follows (`llmctl.layers.quantization.GPTQLinearMethod` is one):

- Subclass `LinearMethodBase`; `llmctl.layers.quantization.get_linear_method` constructs
  it as `Method(quant_config)` with the checkpoint's `GPTQConfig` (see
  `llmctl.config.read_gptq_config`). One instance serves every linear layer of the model.
- `create_weights(layer, input_size, output_sizes, bias, params_dtype)`: register the
  layer's parameters with `layer.register_parameter(name, param)`. Sizes are *per
  partition* (after tensor-parallel splitting): the layer computes
  `x [..., input_size] -> y [..., sum(output_sizes)]`; `output_sizes` lists the fused
  pieces (`[q, kv, kv]` for QKV, `[i, i]` for gate_up, `[n]` otherwise). Parameter
  names are the checkpoint's suffixes (`weight`, `qweight`, `qzeros`, `scales`,
  `g_idx`, `bias`) so the loader maps `...q_proj.qweight` to `qkv_proj.qweight`.
- Tag each parameter with `set_weight_attrs(param, {...})`:
    * `input_dim` / `output_dim`: the dim indexing K / N, or None when the tensor has
      no such dim (a bias has no input_dim; `g_idx` [K] has no output_dim).
    * `packed_dim` and `pack_factor` for packed tensors: e.g. `qweight` [K/8, N]
      has input_dim=0, output_dim=1, packed_dim=0, pack_factor=8; `qzeros` [G, N/8]
      has input_dim=0, output_dim=1, packed_dim=1, pack_factor=8.
  The layer's `weight_loader` uses only these attributes: when fusing along N it
  divides shard offsets by `pack_factor` if `packed_dim == output_dim`; a tensor
  with no output_dim is copied whole and must be identical across the fused
  shards (it is checked). Create parameters with `requires_grad=False`.
    * `ignore_missing=True` lets a checkpoint omit the tensor (e.g. `g_idx` of a
      checkpoint without act-order); `create_weights` must then fill its default.
      Every other parameter must be in the checkpoint or loading fails.
- If `bias`, register `bias` [N] (see `create_bias`); `apply` adds it.
- `apply(layer, x)`: x [..., K] in the model dtype -> y [..., N] in the model dtype.
- `process_weights_after_loading(layer)`: called once after every tensor is loaded;
  repack for the kernel here (e.g. v1 zeros -> v2, act-order permutation). It may
  replace parameters or add buffers; `apply` must only use what it leaves.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmctl.errors import ConfigError, ModelLoadError
from llmctl.layers.tensor_parallel import TensorParallel, kv_heads_per_rank


def set_weight_attrs(param: torch.Tensor, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        if hasattr(param, key):
            raise AttributeError(f"parameter already has attribute {key!r}")
        setattr(param, key, value)


def create_bias(layer: nn.Module, output_size: int, params_dtype: torch.dtype) -> None:
    bias = nn.Parameter(torch.zeros(output_size, dtype=params_dtype), requires_grad=False)
    set_weight_attrs(bias, {"output_dim": 0, "input_dim": None})
    layer.register_parameter("bias", bias)


class LinearMethodBase:
    """How a linear layer stores its weights and multiplies. See the module docstring."""

    def create_weights(
        self, layer: nn.Module, input_size: int, output_sizes: list[int], bias: bool, params_dtype: torch.dtype
    ) -> None:
        raise NotImplementedError

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        return None

    def allocate_workspace(self, max_num_tokens: int, device: torch.device) -> int:
        """Buffers the method's kernels share across layers, for steps of up to max_num_tokens
        tokens: allocated once, at engine start, before the engine measures its memory; returns
        their bytes."""
        return 0


class UnquantizedLinearMethod(LinearMethodBase):
    """A dense weight [N, K] in the model dtype (the Hugging Face layout)."""

    def create_weights(
        self, layer: nn.Module, input_size: int, output_sizes: list[int], bias: bool, params_dtype: torch.dtype
    ) -> None:
        weight = nn.Parameter(torch.empty(sum(output_sizes), input_size, dtype=params_dtype), requires_grad=False)
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0})
        layer.register_parameter("weight", weight)
        if bias:
            create_bias(layer, sum(output_sizes), params_dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N]
        return nn.functional.linear(x, layer.weight, getattr(layer, "bias", None))


class LinearBase(nn.Module):
    """x [..., input_size] -> y [..., output_size], weights made by a linear method.

    `prefix` is the layer's name in the model (model.layers.3.mlp.down_proj): errors name it.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool,
        linear_method: LinearMethodBase | None,
        params_dtype: torch.dtype | None,
        input_shards: int = 1,
        output_shards: int = 1,
        tp: TensorParallel | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.tp = tp or TensorParallel()
        for name, size, shards in [("in_features", input_size, input_shards)] + [
            ("out_features", s, output_shards) for s in output_sizes
        ]:
            if size % shards:
                raise ConfigError(f"{prefix or type(self).__name__}: {name} {size} is not divisible by "
                                  f"tensor_parallel_size {shards}")
        self.input_size = input_size
        self.output_size = sum(output_sizes)
        self.tp_rank = self.tp.rank
        self.tp_size = self.tp.size
        self.input_size_per_partition = input_size // input_shards
        self.input_offset = self.tp_rank * self.input_size_per_partition if input_shards > 1 else 0
        self.output_sizes_per_partition = [s // output_shards for s in output_sizes]
        self.linear_method = linear_method or UnquantizedLinearMethod()
        self.linear_method.create_weights(
            self,
            self.input_size_per_partition,
            self.output_sizes_per_partition,
            bias,
            params_dtype or torch.get_default_dtype(),
        )
        for param in self.parameters(recurse=False):
            param.weight_loader = self.weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N]
        return self.linear_method.apply(self, x)

    def process_weights_after_loading(self) -> None:
        self.linear_method.process_weights_after_loading(self)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int | str | None = None) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, method={type(self.linear_method).__name__}"


def as_tensor(loaded: Any) -> torch.Tensor:
    """A checkpoint tensor, read now if the loader handed a lazy slice of a file."""
    materialize = getattr(loaded, "materialize", None)
    return materialize() if materialize is not None else loaded


def narrow_shard(loaded: Any, dim: int | None, size: int, num_shards: int, index: int) -> Any:
    """Piece `index` of `num_shards` equal pieces of a full checkpoint tensor along `dim`."""
    if dim is None or num_shards == 1:
        return loaded
    if loaded.shape[dim] != size * num_shards:
        raise ModelLoadError(f"dim {dim} of shape {tuple(loaded.shape)} is not {size} x {num_shards} shards")
    return loaded.narrow(dim, index * size, size)


def copy_checked(target: torch.Tensor, source: Any, what: str) -> None:
    if tuple(target.shape) != tuple(source.shape):
        raise ModelLoadError(f"{what}: shape {tuple(source.shape)} does not match the expected {tuple(target.shape)}")
    target.copy_(as_tensor(source))


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole weight."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 linear_method: LinearMethodBase | None = None, params_dtype: torch.dtype | None = None,
                 prefix: str = "") -> None:
        super().__init__(input_size, [output_size], bias, linear_method, params_dtype, prefix=prefix)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int | str | None = None) -> None:
        copy_checked(param.data, loaded_weight, "weight")


class ColumnParallelLinear(LinearBase):
    """Split along the output dim (N): rank r holds rows r*N/tp:(r+1)*N/tp of y (of each
    fused piece); the output stays split, for the row-parallel layer after it."""

    def __init__(self, input_size: int, output_sizes: list[int] | int, bias: bool = False,
                 linear_method: LinearMethodBase | None = None, params_dtype: torch.dtype | None = None,
                 tp: TensorParallel | None = None, prefix: str = "") -> None:
        sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        shards = tp.size if tp is not None else 1
        super().__init__(input_size, sizes, bias, linear_method, params_dtype, output_shards=shards, tp=tp,
                         prefix=prefix)

    def _shard_index(self, shard_id: int | str) -> int:
        return int(shard_id)

    def _rank_piece(self, shard_id: int | str | None) -> tuple[int, int]:
        """(number of pieces the checkpoint tensor splits into, the piece this rank holds)."""
        return self.tp_size, self.tp_rank

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int | str | None = None) -> None:
        output_dim = getattr(param, "output_dim", None)
        if output_dim is None:
            self._load_unsharded(param, loaded_weight, shard_id)
            return
        target = param.data
        if shard_id is not None:
            idx = self._shard_index(shard_id)
            sizes = self.output_sizes_per_partition
            offset, size = sum(sizes[:idx]), sizes[idx]
            if getattr(param, "packed_dim", None) == output_dim:
                offset, size = offset // param.pack_factor, size // param.pack_factor
            target = target.narrow(output_dim, offset, size)
        num_pieces, piece = self._rank_piece(shard_id)
        loaded = narrow_shard(loaded_weight, output_dim, target.shape[output_dim], num_pieces, piece)
        copy_checked(target, loaded, f"shard {shard_id!r}" if shard_id is not None else "weight")

    def _load_unsharded(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int | str | None) -> None:
        # e.g. g_idx [K]: one copy serves all fused shards, so they have to agree.
        loaded_weight = as_tensor(loaded_weight)
        seen = getattr(param, "_loaded_shards", None)
        if seen:
            if tuple(param.data.shape) != tuple(loaded_weight.shape) or not torch.equal(param.data, loaded_weight.to(param.dtype)):
                raise ModelLoadError(f"shard {shard_id!r} disagrees with shard {seen[0]!r} on an unsharded tensor")
        else:
            copy_checked(param.data, loaded_weight, f"shard {shard_id!r}")
            param._loaded_shards = []
        param._loaded_shards.append(shard_id)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs fused along N (gate_up: shard ids 0 and 1)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 linear_method: LinearMethodBase | None = None, params_dtype: torch.dtype | None = None,
                 tp: TensorParallel | None = None, prefix: str = "") -> None:
        super().__init__(input_size, output_sizes, bias, linear_method, params_dtype, tp, prefix)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused along N; shard ids "q", "k", "v".

    Each rank holds num_heads/tp query heads by whole heads. KV heads split likewise when
    tp divides them; with fewer KV heads than ranks, tp/num_kv_heads consecutive ranks share
    one KV head, each holding a replica (their query heads are exactly that head's group).
    """

    _SHARD_IDS = {"q": 0, "k": 1, "v": 2}

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 linear_method: LinearMethodBase | None = None, params_dtype: torch.dtype | None = None,
                 tp: TensorParallel | None = None, prefix: str = "") -> None:
        tp_size = tp.size if tp is not None else 1
        if num_heads % tp_size or (num_kv_heads % tp_size and tp_size % num_kv_heads):
            raise ConfigError(f"{prefix or 'qkv_proj'}: tensor_parallel_size {tp_size} must divide the attention "
                              f"heads ({num_heads}) and divide or be a multiple of the KV heads ({num_kv_heads})")
        self.head_dim = head_dim
        self.num_heads = num_heads // tp_size
        self.num_kv_heads = kv_heads_per_rank(num_kv_heads, tp_size)
        self._total_kv_heads = num_kv_heads
        kv = self.num_kv_heads * tp_size * head_dim  # counts each replica, so it divides by tp
        super().__init__(hidden_size, [num_heads * head_dim, kv, kv], bias, linear_method, params_dtype, tp, prefix)

    def _shard_index(self, shard_id: int | str) -> int:
        if shard_id not in self._SHARD_IDS:
            raise ModelLoadError(f"QKV shard id must be 'q', 'k' or 'v', got {shard_id!r}")
        return self._SHARD_IDS[shard_id]

    def _rank_piece(self, shard_id: int | str | None) -> tuple[int, int]:
        if shard_id == "q" or self._total_kv_heads >= self.tp_size:
            return self.tp_size, self.tp_rank
        return self._total_kv_heads, self.tp_rank // (self.tp_size // self._total_kv_heads)


class RowParallelLinear(LinearBase):
    """Split along the input dim (K): rank r multiplies its slice of x; the partial sums are
    all-reduced, so every rank gets the whole y."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 linear_method: LinearMethodBase | None = None, params_dtype: torch.dtype | None = None,
                 tp: TensorParallel | None = None, prefix: str = "") -> None:
        tp_size = tp.size if tp is not None else 1
        if bias and tp_size > 1:
            # The bias must be added once, after the reduction; not needed by any model we run.
            raise ConfigError(f"{prefix or 'RowParallelLinear'}: bias with tensor_parallel_size > 1 is not supported")
        super().__init__(input_size, [output_size], bias, linear_method, params_dtype, input_shards=tp_size, tp=tp,
                         prefix=prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K/tp] -> [..., N]
        y = self.linear_method.apply(self, x)
        if self.tp_size > 1:
            self.tp.all_reduce(y)
        return y

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int | str | None = None) -> None:
        input_dim = getattr(param, "input_dim", None)
        size = param.data.shape[input_dim] if input_dim is not None else 0
        loaded = narrow_shard(loaded_weight, input_dim, size, self.tp_size, self.tp_rank)
        copy_checked(param.data, loaded, "weight")
