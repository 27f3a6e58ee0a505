"""Random weights of a real architecture (vLLM's `--load-format dummy`): for throughput
and memory measurements of a model whose weights are not on disk, e.g. Llama-3-8B
shapes from recipes/llama3-8b.yaml. Timing does not depend on the weights' values."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llmctl.config import GPTQConfig, ModelConfig
from llmctl.models.arch import ModelArch, load_arch

# What `quantization="gptq"` gives dummy weights: the common GPTQ export (4 bits, group 128,
# symmetric, no act-order, checkpoint format v1).
DUMMY_GPTQ_CONFIG = GPTQConfig(bits=4, group_size=128, desc_act=False, sym=True, checkpoint_format="gptq")

if TYPE_CHECKING:
    from llmctl.models.llama import LlamaForCausalLM


def resolve_dummy_arch(model_config: ModelConfig) -> tuple[ModelArch, Path | None]:
    """(architecture, model dir or None) for an inline `arch` (a recipe's `model.arch`), a
    model dir with config.json, or `default`."""
    from llmctl.errors import ModelLoadError
    from llmctl.models.arch import arch_from_config

    if model_config.arch is not None:
        return arch_from_config(model_config.arch, source="model.arch"), None
    model = model_config.model
    if model == "default":
        from llmctl.models.default import ensure_default_model

        model_dir = ensure_default_model()
        return load_arch(model_dir), model_dir
    model_dir = Path(model)
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"--load-format dummy: {model} is neither a recipe with model.arch nor a dir with config.json")
    return load_arch(model_dir), model_dir


def with_quantization(arch: ModelArch, quantization: str | None) -> ModelArch:
    """`arch` as a GPTQ checkpoint of its shapes would describe it (quantization="gptq")."""
    if quantization is None:
        return arch
    if quantization != "gptq":
        raise ValueError(f"quantization must be gptq or None, got {quantization!r}")
    group = DUMMY_GPTQ_CONFIG.group_size
    if arch.hidden_size % group or arch.intermediate_size % group:
        group = -1  # e.g. hidden 576: one group per column rather than a size that does not divide
    return dataclasses.replace(arch, quantization=dataclasses.replace(DUMMY_GPTQ_CONFIG, group_size=group))


@torch.inference_mode()
def load_dummy_model(arch: ModelArch, dtype: torch.dtype, device: torch.device | str, seed: int = 0,
                     tp=None) -> LlamaForCausalLM:
    """The model built on `device` with N(0, 0.02) matrices, unit norms and zero biases
    (values that keep fp16 activations finite through any depth). For a GPTQ `arch`, the
    linears get random 4-bit codes and zero points with scales that give the same spread.
    Under tensor parallelism (`tp`) each rank draws its own shard (seed + rank): the model is
    not the one tensor_parallel_size 1 would draw, only its shapes are."""
    from llmctl.models.llama import LlamaForCausalLM

    with torch.device(device):
        model = LlamaForCausalLM(arch, dtype=dtype, tp=tp)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed + (tp.rank if tp is not None else 0))
    quant = arch.quantization
    if quant is not None and quant.bits not in _CODE_SPREAD:
        raise ValueError(f"dummy GPTQ weights need 2, 3, 4 or 8 bits, got {quant.bits}")
    for name, param in model.named_parameters():
        if name.endswith("g_idx"):
            continue  # groups in order, as create_weights set them
        if name.endswith("qweight"):
            param.copy_(_centred_codes(quant.bits, param.shape, generator))
        elif name.endswith("qzeros"):
            param.copy_(_sym_zeros(quant, param.shape, param.device))
        elif name.endswith("scales"):
            param.fill_(0.02 / _CODE_SPREAD[quant.bits])  # the dense weights' N(0, 0.02) spread
        elif name.endswith("bias"):
            param.zero_()
        elif param.dim() == 1:
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=generator)
    for module in model.modules():
        hook = getattr(module, "process_weights_after_loading", None)
        if callable(hook):
            hook()
    return model.eval()


# Random codes must be centred on the zero point, as a trained model's are: uniform codes 0..15
# around the zero 8 have a mean of -0.5 steps, the same sign in every weight, and through a
# Llama-3-8B's widths that offset feeds on itself (a uniform part of the residual, normalized,
# sums coherently along K in the next layer) until fp16 overflows: NaN logits. So codes are drawn
# from 1 .. 2**bits - 1, symmetric around 2**(bits-1), with the symmetric zero in every group.
_CODE_SPREAD = {b: (((2**b - 1) ** 2 - 1) / 12) ** 0.5 for b in (2, 3, 4, 8)}  # std of uniform 1 .. 2**b - 1


def _centred_codes(bits: int, packed_shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """qweight int32 [K*bits/32, N] of codes uniform in 1 .. 2**bits - 1 (mean: the zero point)."""
    from llmctl_kernels.reference import pack_qweight

    k = packed_shape[0] * 32 // bits
    codes = torch.randint(1, 2**bits, (k, packed_shape[1]), generator=generator, device=generator.device,
                          dtype=torch.int32)
    return pack_qweight(codes, bits)


def _sym_zeros(config: GPTQConfig, packed_shape: torch.Size, device: torch.device) -> torch.Tensor:
    """qzeros int32 [G, N*bits/32] holding the symmetric zero point, 2**(bits-1), in every group."""
    from llmctl_kernels.reference import pack_qzeros

    n = packed_shape[1] * 32 // config.bits
    stored = (1 << (config.bits - 1)) - config.zero_offset
    return pack_qzeros(torch.full((packed_shape[0], n), stored, dtype=torch.int32, device=device), config.bits)


def stand_in_tokenizer(vocab_size: int):
    """The default model's tokenizer, with placeholder tokens `<|dummy_N|>` added up to
    `vocab_size`: text prompts for a random-weight model whose tokenizer is not here, and
    every id the model samples decodes to some text (a token, or its placeholder)."""
    from tokenizers import AddedToken

    from llmctl.models.default import default_model_dir, ensure_default_model
    from llmctl.models.loader import load_tokenizer

    # The tokenizer files alone will do: no need to convert the default model's weights.
    source = default_model_dir()
    tokenizer = load_tokenizer(source if (source / "tokenizer.json").is_file() else ensure_default_model())
    extra = range(len(tokenizer), vocab_size)
    if extra:
        tokenizer.add_tokens([AddedToken(f"<|dummy_{i}|>", special=False, normalized=False) for i in extra])
    return tokenizer
