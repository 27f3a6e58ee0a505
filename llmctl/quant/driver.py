"""Layer-by-layer GPTQ over our Llama-family model.

Only one decoder layer and the calibration activations live on the device at a
time. The inputs of layer i+1 are the outputs of the already-quantized layer i.
Inside a layer, with `true_sequential`, the linears are quantized in execution
order (qkv, o, gate_up, down) and the layer is re-run before each group, so o's
Hessian sees the quantized qkv, and so on:

    X_i --run to qkv--> H_qkv -> GPTQ(qkv) --run to o--> H_o -> GPTQ(o) -> ...
        ... -> GPTQ(down) --run whole layer--> X_{i+1}

Fused projections are quantized as one matrix with their shared Hessian (GPTQ
treats output rows independently given H, and act-order depends only on H), then
split back into the Hugging Face projections the checkpoint stores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from llmctl.config import GPTQConfig
from llmctl.quant.gptq import GPTQResult, HessianAccumulator, gptq_quantize

# Execution order inside a decoder layer; each tuple is quantized together.
SEQUENTIAL_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",),
)
# Our fused linears -> the checkpoint's projections, in fused order.
HF_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
QUANTIZED_LINEARS = tuple(name for group in SEQUENTIAL_GROUPS for name in group)


@dataclass
class LayerReport:
    """What the progress callback receives after each decoder layer."""

    index: int
    num_layers: int
    losses: dict[str, float]  # our linear name -> GPTQ loss
    seconds: float


@dataclass
class DriverStats:
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0


# (layer-qualified HF name such as "model.layers.3.self_attn.q_proj", result)
ResultSink = Callable[[str, GPTQResult], None]
LayerCallback = Callable[[LayerReport], None]


class _StopForward(Exception):
    """Raised by the last hook of a group: the rest of the layer is not needed."""


def hf_names(linear: str) -> tuple[str, ...]:
    return HF_PROJECTIONS.get(linear, (linear,))


def capture_layer0_inputs(model: nn.Module, calib_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """calib_ids: [n, S] -> the residual stream entering layer 0, [n, S, D], on `device`."""
    embed = model.model.embed_tokens
    original = embed.weight.device
    embed.to(device)
    try:
        with torch.no_grad():
            return torch.cat([embed(ids.unsqueeze(0).to(device)) for ids in calib_ids])
    finally:
        embed.to(original)


def _run_layer(layer: nn.Module, states: torch.Tensor, batch_size: int) -> torch.Tensor | None:
    """states: [n, S, D] -> the layer's output residual stream [n, S, D]."""
    outputs = []
    seq_len = states.shape[1]
    positions = torch.arange(seq_len, device=states.device)
    for start in range(0, states.shape[0], batch_size):
        x = states[start:start + batch_size]
        hidden, residual = layer(positions.expand(x.shape[0], seq_len), x, None)
        outputs.append(hidden + residual)
    return torch.cat(outputs)


def _collect_hessians(layer: nn.Module, names: tuple[str, ...], states: torch.Tensor,
                      batch_size: int) -> dict[str, HessianAccumulator]:
    """Run the layer over all samples, accumulating each named linear's input Hessian."""
    modules = {name: layer.get_submodule(name) for name in names}
    accs = {name: HessianAccumulator(m.weight.shape[1], states.device) for name, m in modules.items()}
    remaining: set[str] = set()

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            accs[name].add_batch(args[0])
            remaining.discard(name)
            if not remaining:
                raise _StopForward

        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in modules.items()]
    positions = torch.arange(states.shape[1], device=states.device)
    try:
        for start in range(0, states.shape[0], batch_size):
            x = states[start:start + batch_size]
            remaining.update(names)
            try:
                layer(positions.expand(x.shape[0], states.shape[1]), x, None)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return accs


def quantize_layer(layer: nn.Module, states: torch.Tensor, settings: GPTQConfig, true_sequential: bool,
                   batch_size: int, prefix: str, sink: ResultSink) -> dict[str, float]:
    """GPTQ every linear of one decoder layer in place (weights become fake-quantized)."""
    groups = SEQUENTIAL_GROUPS if true_sequential else (QUANTIZED_LINEARS,)
    losses: dict[str, float] = {}
    for names in groups:
        accs = _collect_hessians(layer, names, states, batch_size)
        for name in names:
            module = layer.get_submodule(name)
            result = gptq_quantize(module.weight.data, accs[name].hessian, settings, accs[name].num_tokens)
            del accs[name].hessian
            module.weight.data.copy_(result.dequantize().to(module.weight.dtype))
            losses[name] = result.loss
            _emit(result, name, module, prefix, sink)
    return losses


def _emit(result: GPTQResult, name: str, module: nn.Module, prefix: str, sink: ResultSink) -> None:
    from llmctl.quant.packing import split_result

    pieces = hf_names(name)
    sizes = list(getattr(module, "output_sizes_per_partition", [result.codes.shape[0]]))
    parts = split_result(result, sizes) if len(pieces) > 1 else [result]
    for hf_name, part in zip(pieces, parts):
        sink(f"{prefix}.{hf_name}", part)


@torch.no_grad()
def quantize_model_layers(model: nn.Module, calib_ids: torch.Tensor, settings: GPTQConfig, sink: ResultSink,
                          device: torch.device | str = "cpu", true_sequential: bool = True,
                          batch_size: int = 1, on_layer: LayerCallback | None = None) -> DriverStats:
    """Quantize every decoder layer of `model` (weights replaced by their fake-quantized values).

    calib_ids: [n, S] token ids. The model may stay on the CPU; each layer visits
    `device` in turn. Results go to `sink` in layer order.
    """
    device = torch.device(device)
    start = time.perf_counter()
    stats = DriverStats()
    states = capture_layer0_inputs(model, calib_ids, device)
    layers = model.model.layers
    for index, layer in enumerate(layers):
        t0 = time.perf_counter()
        home = next(layer.parameters()).device
        layer.to(device)
        losses = quantize_layer(layer, states, settings, true_sequential, batch_size,
                                f"model.layers.{index}", sink)
        states = _run_layer(layer, states, batch_size)
        layer.to(home)
        report = LayerReport(index=index, num_layers=len(layers), losses=losses, seconds=time.perf_counter() - t0)
        stats.layers.append(report)
        if on_layer is not None:
            on_layer(report)
    stats.seconds = time.perf_counter() - start
    return stats
