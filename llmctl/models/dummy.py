"""Random weights of a real architecture (vLLM's `--load-format dummy`): for throughput
and memory measurements of a model whose weights are not on disk, e.g. Llama-3-8B
shapes from recipes/llama3-8b.yaml. Timing does not depend on the weights' values."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llmctl.models.arch import ModelArch, load_arch

if TYPE_CHECKING:
    from llmctl.models.llama import LlamaForCausalLM


def resolve_dummy_arch(model: str) -> tuple[ModelArch, Path | None]:
    """(architecture, model dir or None) for a recipe with an inline `model.arch`, a model
    dir with config.json, or `default`."""
    from llmctl.errors import ModelLoadError

    if model.endswith((".yaml", ".yml")):
        from llmctl.recipe import load_recipe

        recipe = load_recipe(model)
        if recipe.arch is not None:
            return recipe.arch, None
        model = recipe.model.model
    if model == "default":
        from llmctl.models.default import ensure_default_model

        model_dir = ensure_default_model()
        return load_arch(model_dir), model_dir
    model_dir = Path(model)
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"--load-format dummy: {model} is neither a recipe with model.arch nor a dir with config.json")
    return load_arch(model_dir), model_dir


@torch.inference_mode()
def load_dummy_model(arch: ModelArch, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> LlamaForCausalLM:
    """The model built on `device` with N(0, 0.02) matrices, unit norms and zero biases
    (values that keep fp16 activations finite through any depth)."""
    from llmctl.models.llama import LlamaForCausalLM

    with torch.device(device):
        model = LlamaForCausalLM(arch, quant_config=None, dtype=dtype)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
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
