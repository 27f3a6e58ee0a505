"""Quantized linear methods (vLLM keeps them under its layers too): the GPTQ method, with
parameters in the AutoGPTQ/GPTQModel layout, and `get_linear_method`, which picks a
checkpoint's method from its `GPTQConfig`.

On CUDA (2/4/8 bits) `apply` runs the Triton W4A16 kernels on weights prepared once
in `process_weights_after_loading`. On the CPU the weights are dequantized once, at
load, into the compute dtype and the codes are dropped: the model then takes the
memory of the dense original and runs at its speed (dequantizing every call was 13-25x
slower; torch's CPU int4 matmul was measured against it, see docs/benchmarks.md).
A 3-bit checkpoint on a GPU has no kernel: it dequantizes every weight on every call,
and says so once when it loads.
"""

from __future__ import annotations

import warnings
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from llmctl.config import GPTQConfig
from llmctl.errors import ModelLoadError
from llmctl.layers.linear import LinearMethodBase, UnquantizedLinearMethod, create_bias, set_weight_attrs
from llmctl_kernels.reference import dequantize_gptq


def get_linear_method(quant_config: GPTQConfig | None) -> LinearMethodBase:
    """The linear method of a checkpoint: GPTQ for a GPTQ config, dense for None."""
    return UnquantizedLinearMethod() if quant_config is None else GPTQLinearMethod(quant_config)


# Bit widths the Triton kernels take (3-bit codes straddle int32 words).
KERNEL_BITS = (2, 4, 8)


def gpu_dense_fallback_warning(bits: int, device: torch.device | str) -> str | None:
    """The load-time warning for GPTQ weights on `device` that no kernel takes, else None.
    On the CPU every width is dequantized once at load by design: no warning there."""
    if torch.device(device).type != "cuda" or bits in KERNEL_BITS:
        return None
    return (f"{bits}-bit GPTQ weights have no GPU kernel: every forward dequantizes each whole weight "
            f"matrix to a dense copy before its matmul, far slower than the {'/'.join(map(str, KERNEL_BITS))}-bit "
            "kernels; quantize with --bits 4 to serve at speed")


def _pack_factor(bits: int) -> int | Fraction:
    # 3-bit packs 32 codes into 3 words; a Fraction keeps `offset // pack_factor` exact.
    return Fraction(32, 3) if bits == 3 else 32 // bits


class GPTQLinearMethod(LinearMethodBase):
    """One instance serves every linear of a GPTQ checkpoint (see llmctl.layers.linear)."""

    def __init__(self, quant_config: GPTQConfig) -> None:
        self.config = quant_config
        self._max_out_features = 0  # of the layers prepared for the kernels
        self.scratch = None  # SplitKScratch shared by every layer, once allocate_workspace ran
        self._warned = False  # one warning per model: this method serves all its linears

    def create_weights(
        self, layer: nn.Module, input_size: int, output_sizes: list[int], bias: bool, params_dtype: torch.dtype
    ) -> None:
        bits, gs = self.config.bits, self.config.group_size
        factor = _pack_factor(bits)
        out_size = sum(output_sizes)
        group_size = gs if gs > 0 else input_size
        full_input = getattr(layer, "input_size", input_size)
        layer_name = getattr(layer, "prefix", "") or "linear"
        row_split = input_size != full_input
        if input_size % group_size and not (row_split and self.config.desc_act):
            raise ModelLoadError(f"{layer_name}: group_size {gs} does not divide in_features {input_size}"
                                 + (f" ({full_input} split across ranks)" if row_split else ""))
        if (bits == 3 and input_size % 32) or input_size * bits % 32 or out_size * bits % 32:
            raise ModelLoadError(f"{layer_name}: a {out_size}x{input_size} linear (this rank's shard) cannot hold "
                                 f"{bits}-bit packed weights")
        num_groups = input_size // group_size
        layer.compute_dtype = params_dtype
        # Under a row split (K cut across ranks) the groups split with K, except with act-order
        # (g_idx jumps between groups) or one group for all of K: then every rank keeps the
        # scales and zeros whole, as vLLM does. g_idx always indexes the groups this rank holds.
        groups_dim: int | None = 0
        layer.gptq_group_offset = 0
        if row_split:
            if self.config.desc_act or gs <= 0:
                groups_dim, num_groups = None, -(-full_input // gs) if gs > 0 else 1
            else:
                layer.gptq_group_offset = layer.input_offset // group_size

        def param(shape: tuple[int, ...], dtype: torch.dtype, attrs: dict[str, Any], name: str) -> None:
            p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            set_weight_attrs(p, attrs)
            layer.register_parameter(name, p)

        param((input_size * bits // 32, out_size), torch.int32,
              {"input_dim": 0, "output_dim": 1, "packed_dim": 0, "pack_factor": factor}, "qweight")
        param((num_groups, out_size * bits // 32), torch.int32,
              {"input_dim": groups_dim, "output_dim": 1, "packed_dim": 1, "pack_factor": factor}, "qzeros")
        param((num_groups, out_size), torch.float16, {"input_dim": groups_dim, "output_dim": 1}, "scales")
        param((input_size,), torch.int32, {"input_dim": 0, "output_dim": None, "ignore_missing": True}, "g_idx")
        # Checkpoints written without act-order may omit g_idx; groups are then in order. Like a
        # checkpoint's, it counts groups of the whole K; process_weights_after_loading rebases it.
        first = getattr(layer, "input_offset", 0)
        g_idx = torch.arange(first, first + input_size, dtype=torch.int32) // group_size if gs > 0 else 0
        layer.g_idx.data.copy_(g_idx)
        if bias:
            create_bias(layer, out_size, params_dtype)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if getattr(layer, "w4a16", None) is not None or getattr(layer, "dense_weight", None) is not None:
            return  # prepared already (the checkpoint's codes may be gone)
        layer.w4a16 = layer.dense_weight = None
        self._rebase_groups(layer)
        if layer.qweight.device.type == "cpu":
            self._dequantize_once(layer)
            return
        if not layer.qweight.is_cuda:
            return
        fallback = gpu_dense_fallback_warning(self.config.bits, layer.qweight.device)
        if fallback is not None:
            if not self._warned:
                warnings.warn(fallback, stacklevel=2)
                self._warned = True
            return
        from llmctl_kernels.w4a16 import prepare_w4a16_weights

        layer.w4a16 = prepare_w4a16_weights(
            layer.qweight.data, layer.qzeros.data, layer.scales.data, layer.g_idx.data,
            bits=self.config.bits, zero_offset=self.config.zero_offset,
        )
        self._max_out_features = max(self._max_out_features, layer.w4a16.out_features)
        if layer.w4a16.qweight.data_ptr() != layer.qweight.data_ptr():
            # The kernels read a repacked copy (fragment order, or rows sorted by group):
            # the checkpoint's codes would only double the weight memory.
            layer.qweight.data = layer.qweight.data.new_empty(0)

    def allocate_workspace(self, max_num_tokens: int, device: torch.device) -> int:
        """The split-K scratch every layer's kernels share (llmctl_kernels/w4a16/scratch.py); returns its
        bytes. It holds SPLIT_K_MAX_M rows whatever max_num_tokens is: a graph's padded batch
        (a bucket) may have more rows than a step's token budget."""
        if self.scratch is not None or self._max_out_features == 0 or device.type != "cuda":
            return 0 if self.scratch is None else self.scratch.num_bytes
        from llmctl_kernels.w4a16 import SPLIT_K_MAX_M, SplitKScratch

        self.scratch = SplitKScratch(device, SPLIT_K_MAX_M, self._max_out_features)
        return self.scratch.num_bytes

    @staticmethod
    def _rebase_groups(layer: nn.Module) -> None:
        """g_idx of a row shard whose groups were split: global group numbers -> this rank's."""
        offset = getattr(layer, "gptq_group_offset", 0)
        if offset:
            layer.g_idx.data -= offset
        g_idx, num_groups = layer.g_idx.data, layer.scales.shape[0]
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= num_groups):
            raise ModelLoadError(
                f"{getattr(layer, 'prefix', '') or 'a GPTQ linear'}: g_idx points outside the {num_groups} groups "
                f"this rank holds", hint="a checkpoint without desc_act must keep its groups in input order")

    def _dequantize_once(self, layer: nn.Module) -> None:
        weight = dequantize_gptq(layer.qweight.data, layer.qzeros.data, layer.scales.data.to(torch.float32),
                                 layer.g_idx.data, bits=self.config.bits, zero_offset=self.config.zero_offset)  # [K, N]
        layer.dense_weight = weight.t().contiguous().to(layer.compute_dtype)  # [N, K], as nn.Linear keeps it
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            getattr(layer, name).data = getattr(layer, name).data.new_empty(0)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N]
        bias = getattr(layer, "bias", None)
        dense = getattr(layer, "dense_weight", None)
        if dense is not None:
            return torch.nn.functional.linear(x, dense if dense.dtype == x.dtype else dense.to(x.dtype), bias)
        prepared = getattr(layer, "w4a16", None)
        if prepared is not None and x.dtype in (torch.float16, torch.bfloat16):
            from llmctl_kernels.w4a16 import w4a16_matmul

            return w4a16_matmul(x, prepared, bias.to(x.dtype) if bias is not None else None, scratch=self.scratch)
        if prepared is not None:  # e.g. fp32 activations on CUDA
            from llmctl_kernels.w4a16 import w4a16_dequantize

            weight = w4a16_dequantize(prepared, torch.float32)  # [K, N]
        else:
            weight = dequantize_gptq(layer.qweight, layer.qzeros, layer.scales.to(torch.float32), layer.g_idx,
                                     bits=self.config.bits, zero_offset=self.config.zero_offset)  # [K, N]
        return torch.nn.functional.linear(x, weight.t().to(x.dtype), bias)


def held_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights `model` holds, each storage once: its parameters, and what a GPTQ
    layer keeps beside them once prepared (the CPU's dequantized copy, the kernels' repacked
    codes), which are not parameters. What `llmctl plan` predicts as a rank's weights."""
    seen: dict[int, int] = {}

    def add(t) -> None:
        if isinstance(t, torch.Tensor) and t.numel():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for p in model.parameters():
        add(p)
    for m in model.modules():
        add(getattr(m, "dense_weight", None))
        prepared = getattr(m, "w4a16", None)
        for t in vars(prepared).values() if prepared is not None else ():
            add(t)
    return sum(seen.values())

