"""Tensor parallelism on the CPU (gloo): sharded models through the real loader give the
logits of the whole model, for dense and GPTQ checkpoints of shrunk Llama-3, Qwen2 and
Mistral shapes, with KV heads split and replicated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmctl.engine.distributed import Rendezvous
from llmctl.errors import ConfigError, ModelLoadError
from llmctl.layers.tensor_parallel import TensorParallel
from llmctl.models.arch import load_arch
from llmctl.models.llama import LlamaForCausalLM
from llmctl.models.loader import load_model, load_weights, weight_files

RANK_SCRIPT = Path(__file__).with_name("tp_rank_logits.py")
LINEARS = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv", "o_proj": "o", "gate_proj": "i", "up_proj": "i", "down_proj": "d"}

# name -> (architecture, config overrides); vocab 251 does not divide by 2: the last rank pads.
ARCHS = {
    "llama3": ("LlamaForCausalLM", {"num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 500000.0,
                                    "tie_word_embeddings": False}),
    "qwen2": ("Qwen2ForCausalLM", {"num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}),
    "mistral": ("MistralForCausalLM", {"num_attention_heads": 4, "num_key_value_heads": 1, "tie_word_embeddings": False,
                                       "sliding_window": None}),
}
# (sym, group_size, desc_act)
GPTQ_VARIANTS = [(True, -1, False), (True, 32, False), (False, 32, True), (False, -1, True), (True, 32, True),
                 (False, 32, False)]


def _gen(case: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(case.encode()))


def _config(arch: str, overrides: dict) -> dict:
    return {"architectures": [arch], "vocab_size": 251, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "head_dim": 16, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
            "torch_dtype": "float32", **overrides}


def _sizes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(K, N) of each linear kind."""
    d, i, dh = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * dh, cfg["num_key_value_heads"] * dh
    return {"q": (d, q), "kv": (d, kv), "o": (q, d), "i": (d, i), "d": (i, d)}


def _gptq_tensors(k: int, n: int, sym: bool, group: int, act: bool, g: torch.Generator,
                  g_idx: torch.Tensor) -> dict[str, torch.Tensor]:
    gs = group if group > 0 else k
    num_groups = k // gs
    ints = lambda *shape: torch.randint(-2**31, 2**31 - 1, shape, generator=g, dtype=torch.int64).to(torch.int32)
    qzeros = torch.full((num_groups, n // 8), 0x77777777, dtype=torch.int64).to(torch.int32) if sym else ints(num_groups, n // 8)
    return {"qweight": ints(k // 8, n), "qzeros": qzeros, "g_idx": g_idx.clone(),
            "scales": (torch.rand(num_groups, n, generator=g) * 0.01 + 0.005).to(torch.float16)}


def _g_idx(k: int, group: int, act: bool, g: torch.Generator) -> torch.Tensor:
    g_idx = torch.arange(k, dtype=torch.int32) // (group if group > 0 else k)
    return g_idx[torch.randperm(k, generator=g)] if act else g_idx


def write_model(path: Path, name: str, quant: tuple[bool, int, bool] | None) -> Path:
    arch, overrides = ARCHS[name]
    cfg = _config(arch, overrides)
    g = _gen(f"{name}-{quant}")
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(251, 64, generator=g) * 0.5,
                                        "model.norm.weight": 1 + 0.1 * torch.randn(64, generator=g)}
    if not cfg["tie_word_embeddings"]:
        tensors["lm_head.weight"] = torch.randn(251, 64, generator=g) * 0.1
    sizes = _sizes(cfg)
    for layer in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{layer}"
        g_idx: dict[str, torch.Tensor] = {}
        tensors[f"{pre}.input_layernorm.weight"] = 1 + 0.1 * torch.randn(64, generator=g)
        tensors[f"{pre}.post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(64, generator=g)
        for proj, kind in LINEARS.items():
            part = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            k, n = sizes[kind]
            if quant is None:
                tensors[f"{pre}.{part}.{proj}.weight"] = torch.randn(n, k, generator=g) * k ** -0.5
            else:
                # Projections that read the same input (q/k/v, gate/up) share one act-order g_idx.
                shared = "qkv" if kind in ("q", "kv") else "gate_up" if kind == "i" else proj
                if shared not in g_idx:
                    g_idx[shared] = _g_idx(k, quant[1], quant[2], g)
                for suffix, t in _gptq_tensors(k, n, *quant, g, g_idx[shared]).items():
                    tensors[f"{pre}.{part}.{proj}.{suffix}"] = t
            if arch == "Qwen2ForCausalLM" and proj in ("q_proj", "k_proj", "v_proj"):
                tensors[f"{pre}.{part}.{proj}.bias"] = 0.1 * torch.randn(n, generator=g)
    if quant is not None:
        sym, group, act = quant
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": act,
                                      "sym": sym, "checkpoint_format": "gptq" if sym else "gptq_v2"}
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, path / "model.safetensors")
    save_file({"input_ids": torch.randint(0, 251, (2, 9), generator=g)}, path / "inputs.safetensors")
    return path


def run_ranks(world: int, out_dir: Path, model_dirs: list[Path]) -> None:
    port = Rendezvous.local(world).port
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(RANK_SCRIPT), str(r), str(world), str(port), str(out_dir),
                               *map(str, model_dirs)], env=env, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    try:
        errors = [p.communicate(timeout=600)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(errors)


CASES = [(name, None) for name in ARCHS] + [(name, v) for name in ARCHS for v in GPTQ_VARIANTS[:2]] + \
        [("llama3", v) for v in GPTQ_VARIANTS[2:]]


def test_tp2_logits_equal_tp1_dense_and_gptq(tmp_path: Path) -> None:
    """One pair of gloo ranks loads every case (spawning once keeps this fast)."""
    dirs = [write_model(tmp_path / f"m{i}", name, quant) for i, (name, quant) in enumerate(CASES)]
    run_ranks(2, tmp_path, dirs)
    for i, ((name, quant), model_dir) in enumerate(zip(CASES, dirs)):
        ids = load_file(model_dir / "inputs.safetensors")["input_ids"]
        with torch.inference_mode():
            expected = load_model(model_dir, "float32", "cpu").logits(ids)
        got = load_file(tmp_path / f"logits_{i}.safetensors")["logits"]
        assert got.shape == expected.shape == (2, 9, 251)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=lambda m: f"{name} {quant}: {m}")


def test_shards_hold_their_slice_only(tmp_path: Path) -> None:
    """KV heads replicate past their count, the vocabulary pads, act-order keeps groups whole
    (what each rank reads, before the CPU dequantizes its GPTQ shard)."""
    model_dir = write_model(tmp_path / "m", "mistral", (False, 32, True))  # 1 KV head
    shards = []
    for rank in range(2):
        model = LlamaForCausalLM(load_arch(model_dir), dtype=torch.float32, tp=TensorParallel(rank, 2))
        load_weights(model, weight_files(model_dir))
        shards.append(model)
    full = load_file(model_dir / "model.safetensors")
    for rank, model in enumerate(shards):
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        assert (attn.qkv_proj.num_heads, attn.qkv_proj.num_kv_heads) == (2, 1)
        assert attn.attn.num_kv_heads == 1
        k_cols = attn.qkv_proj.qweight[:, 32:48]  # this rank's k: the one KV head, replicated
        assert torch.equal(k_cols, full["model.layers.0.self_attn.k_proj.qweight"])
        assert mlp.down_proj.qweight.shape == (128 // 2 // 8, 64)
        assert mlp.down_proj.scales.shape == (128 // 32, 64)  # act-order: every group on every rank
        emb = model.model.embed_tokens.weight
        assert emb.shape == (126, 64)
        rows = min(126, 251 - 126 * rank)
        assert torch.equal(emb[:rows], full["model.embed_tokens.weight"][126 * rank:126 * rank + rows])
        assert not emb[rows:].any()


def test_shape_that_does_not_divide_names_the_layer(tmp_path: Path) -> None:
    model_dir = write_model(tmp_path / "m", "llama3", None)
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.qkv_proj: tensor_parallel_size 3 must divide "
                                          r"the attention heads \(4\)"):
        load_model(model_dir, "float32", "cpu", tp=TensorParallel(0, 3))
    gptq_dir = write_model(tmp_path / "g", "llama3", (True, 32, False))
    with pytest.raises((ConfigError, ModelLoadError), match=r"model\.layers\.0\.self_attn\.o_proj: group_size 32 does "
                                                           r"not divide in_features 16 \(64 split across ranks\)"):
        load_model(gptq_dir, "float32", "cpu", tp=TensorParallel(0, 4))
