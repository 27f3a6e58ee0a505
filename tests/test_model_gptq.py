"""A GPTQ checkpoint read through the real loader equals the dense model of its dequantized weights.

The checkpoint is written here with an independent packer (round-to-nearest 4-bit,
act-order g_idx, v1 zeros), so loader, fused-shard placement and the GPTQ linear
method are checked against transformers running the same weights densely.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from llmctl.models.loader import load_model

BITS, GROUP = 4, 16
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_SAME_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def _pack(q: torch.Tensor, dim: int) -> torch.Tensor:
    """8 nibbles per int32 along `dim`, least significant first."""
    q = q.to(torch.int64).movedim(dim, 0)
    q = q.reshape(q.shape[0] // 8, 8, *q.shape[1:])
    words = sum(q[:, i] << (4 * i) for i in range(8))
    return _to_int32(words).movedim(0, dim).contiguous()


def _quantize(w: torch.Tensor, g_idx: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Symmetric RTN of w [N, K] with groups g_idx [K]; returns packed tensors and the dense [N, K] it encodes."""
    wt = w.t()  # [K, N]
    num_groups = int(g_idx.max()) + 1
    scales = torch.stack([wt[g_idx == g].abs().amax(0) for g in range(num_groups)]) * 2 / 15  # [G, N]
    scales = scales.to(torch.float16).clamp_min(1e-4)
    s = scales.float()[g_idx.long()]  # [K, N]
    q = torch.clamp(torch.round(wt / s) + 8, 0, 15)
    dense = (s * (q - 8)).t()
    zeros = torch.full((num_groups, wt.shape[1]), 8 - 1)  # format v1 stores zero - 1
    tensors = {"qweight": _pack(q, 0), "qzeros": _pack(zeros, 1), "scales": scales, "g_idx": g_idx.to(torch.int32)}
    return tensors, dense


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM]:
    path = tmp_path_factory.mktemp("gptq")
    cfg = LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.08)
    tensors: dict[str, torch.Tensor] = {}
    perms: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(5)
    for name, p in ref.state_dict().items():
        prefix, _, leaf = name.rpartition(".")
        block, _, module = prefix.rpartition(".")
        if module not in LINEARS or leaf != "weight":
            tensors[name] = p.contiguous()
            continue
        # Act-order: groups follow a permutation of the input dim; projections reading
        # the same input (q/k/v, gate/up) share it, as GPTQ's shared Hessian makes them.
        key = f"{block}.{_SAME_INPUT.get(module, module)}"
        if key not in perms:
            perms[key] = torch.randperm(p.shape[1], generator=gen)
        g_idx = torch.empty(p.shape[1], dtype=torch.int64)
        g_idx[perms[key]] = torch.arange(p.shape[1]) // GROUP
        packed, dense = _quantize(p, g_idx)
        p.data.copy_(dense)  # the reference now runs exactly the weights the checkpoint encodes
        tensors.update({f"{prefix}.{k}": t for k, t in packed.items()})
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    cfg_dict = json.loads(cfg.to_json_string())
    cfg_dict.update(architectures=["LlamaForCausalLM"], torch_dtype="float32")
    cfg_dict["quantization_config"] = {"quant_method": "gptq", "bits": BITS, "group_size": GROUP, "desc_act": True,
                                       "sym": True, "checkpoint_format": "gptq"}
    (path / "config.json").write_text(json.dumps(cfg_dict))
    return path, ref


def test_gptq_checkpoint_matches_its_dequantized_dense_model(gptq_dir) -> None:
    path, ref = gptq_dir
    ours = load_model(path)
    attn = ours.model.layers[0].self_attn.qkv_proj
    assert type(attn.linear_method).__name__ == "GPTQLinearMethod"
    # On the CPU the codes are dequantized once at load into the compute dtype, then dropped.
    assert attn.dense_weight.shape == (64 + 2 * 32, 64) and attn.dense_weight.dtype == torch.float32
    assert attn.qweight.numel() == 0 and attn.qzeros.numel() == 0
    ids = torch.randint(0, 160, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = ref(ids).logits
        got = ours.compute_logits(ours(ids, torch.arange(24).expand(2, 24)))
    assert expected.abs().max() > 0.5
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_gptq_checkpoint_with_a_wrong_qweight_shape(gptq_dir, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from llmctl.errors import ModelLoadError

    path, _ = gptq_dir
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.qweight"] = tensors["model.layers.1.mlp.up_proj.qweight"][:, :120].contiguous()
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=r"tensor model.layers.1.mlp.up_proj.qweight: shard 1: shape \(8, 120\)"):
        load_model(tmp_path)
