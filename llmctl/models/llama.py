"""llmctl's Llama-family model: Llama 2/3, Mistral, Qwen2 (qkv bias) and SmolLM.

One module tree for all four; the differences are config values. Linear layers
take a linear method (dense or GPTQ), attention reads the engine's metadata when
it is set and runs dense causal attention otherwise.

Input is either a dense batch (input_ids/positions [B, S], no cache) or the
engine's flattened step (input_ids/positions [T] with AttentionMetadata set).
"""

from __future__ import annotations

import torch
from torch import nn

from llmctl.layers.activation import SiluAndMul
from llmctl.layers.attention import Attention
from llmctl.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from llmctl.layers.layernorm import RMSNorm
from llmctl.layers.linear import (
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from llmctl.layers.quantization import get_linear_method
from llmctl.layers.rotary import RotaryEmbedding
from llmctl.layers.tensor_parallel import TensorParallel
from llmctl.models.arch import ModelArch


class LlamaMLP(nn.Module):
    def __init__(self, arch: ModelArch, linear_method: LinearMethodBase, dtype: torch.dtype,
                 tp: TensorParallel, prefix: str) -> None:
        super().__init__()
        d, i = arch.hidden_size, arch.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(d, [i, i], linear_method=linear_method, params_dtype=dtype,
                                                       tp=tp, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(i, d, linear_method=linear_method, params_dtype=dtype, tp=tp,
                                           prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., D] -> [..., D]
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArch, linear_method: LinearMethodBase, dtype: torch.dtype, rotary_emb: RotaryEmbedding,
                 tp: TensorParallel, prefix: str, sliding_window: int | None = None) -> None:
        super().__init__()
        h, hkv, dh = arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim
        self.qkv_proj = QKVParallelLinear(
            arch.hidden_size, dh, h, hkv, bias=arch.attention_bias, linear_method=linear_method, params_dtype=dtype,
            tp=tp, prefix=f"{prefix}.qkv_proj",
        )
        h, hkv = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # this rank's heads
        self.q_size, self.kv_size = h * dh, hkv * dh
        # Llama's attention_bias covers o_proj too; Qwen2 biases only q, k and v.
        o_bias = arch.attention_bias and arch.architecture != "Qwen2ForCausalLM"
        self.o_proj = RowParallelLinear(arch.num_attention_heads * dh, arch.hidden_size, bias=o_bias,
                                        linear_method=linear_method, params_dtype=dtype, tp=tp, prefix=f"{prefix}.o_proj")
        self.rotary_emb = rotary_emb
        self.attn = Attention(h, hkv, dh, scale=dh**-0.5, sliding_window=sliding_window)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        # positions: [...], hidden: [..., D] -> [..., D]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, linear_method: LinearMethodBase, dtype: torch.dtype, rotary_emb: RotaryEmbedding,
                 tp: TensorParallel, layer: int) -> None:
        super().__init__()
        prefix = f"model.layers.{layer}"
        self.self_attn = LlamaAttention(arch, linear_method, dtype, rotary_emb, tp, f"{prefix}.self_attn",
                                        arch.layer_sliding_window(layer))
        self.mlp = LlamaMLP(arch, linear_method, dtype, tp, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # hidden, residual: [..., D]; the residual stream is carried unnormalized.
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArch, linear_method: LinearMethodBase, dtype: torch.dtype, tp: TensorParallel) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, dtype, tp)
        # One cos/sin table for all layers: at 128k context it is ~130 MB.
        rotary_emb = RotaryEmbedding(arch.head_dim, arch.max_position_embeddings, arch.rope_theta, arch.rope_scaling)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(arch, linear_method, dtype, rotary_emb, tp, i) for i in range(arch.num_hidden_layers)
        )
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [B, S] or [T] -> [..., D]
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """The whole model. `forward` returns hidden states; `compute_logits` turns chosen rows into logits."""

    # Checkpoint projections fused into one of our layers: (our name, HF name, shard id).
    stacked_params_mapping: tuple[tuple[str, str, int | str], ...] = (
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    )

    def __init__(self, arch: ModelArch, dtype: torch.dtype = torch.float32, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.dtype = dtype
        self.tp = tp or TensorParallel()
        self.model = LlamaModel(arch, get_linear_method(arch.quantization), dtype, self.tp)
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, dtype, self.tp)
        if arch.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [B, S] (dense, no cache) or [T] (engine step, metadata set) -> [..., D]
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        # hidden: [..., D] -> [..., V] float32 (tp > 1: [R, D] -> [R, V] gathered on rank 0; see ParallelLMHead)
        logits = self.lm_head(hidden)
        return None if logits is None else logits.float()

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Dense convenience: input_ids [B, S] (or [S]) -> float32 logits at every position."""
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
        return self.compute_logits(self.forward(input_ids, positions))
