"""Shared fixtures: the embedded default model, converted once per machine."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Test shapes are small, and on a busy machine two OpenMP threads spin-waiting
    # on each other make a 135M-model forward ~20x slower than one thread. An
    # explicit OMP_NUM_THREADS still wins.
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The converted default model (SmolLM2-135M-Instruct, fp32 safetensors HF dir).

    Lives in LLMCTL_HOME if set, else the user cache, so the ~25 s conversion from
    the GGUF happens once per machine, not once per test run.
    """
    from llmctl.models.default import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def default_model(default_model_dir: Path):
    """llmctl's own model for the default checkpoint, fp32 on the CPU, loaded once."""
    from llmctl.models.loader import load_model

    return load_model(default_model_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def default_tokenizer(default_model_dir: Path):
    from llmctl.models.loader import load_tokenizer

    return load_tokenizer(default_model_dir)


@pytest.fixture(scope="session")
def sentencepiece_tokenizer():
    """A Llama-2-style tokenizer ("▁" for spaces, byte-fallback tokens for other characters,
    leading space stripped on decode), built here on the real tokenizers pipeline."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])}
    for ch in "▁" + string.ascii_letters + ",.":
        vocab.setdefault(ch, len(vocab))
    merges = []
    for word in ("▁The", "▁capital", "▁of", "▁France", "▁is", "▁Paris", "▁fox"):
        for i in range(2, len(word) + 1):
            merges.append((word[: i - 1], word[i - 1]))
            vocab.setdefault(word[:i], len(vocab))
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _interop_library(name: str) -> ModuleType:
    """A library of the interop extra. Missing, it fails the test: `pytest -m interop`
    without the extra must not pass by skipping everything."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        problem = str(err)
    pytest.fail(f"{name} is not importable ({problem}); install the interop extra: make setup-interop", pytrace=False)


@pytest.fixture(scope="session")
def gptqmodel() -> ModuleType:
    # GPTQModel sizes its CPU thread pool at import; DESIGN.md: two workers on 2 cores.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    return _interop_library("gptqmodel")


@pytest.fixture(scope="session")
def optimum() -> ModuleType:
    # transformers loads GPTQ checkpoints through optimum (and GPTQModel's kernels).
    return _interop_library("optimum")


@pytest.fixture(scope="session")
def lm_eval() -> ModuleType:
    return _interop_library("lm_eval")


@pytest.fixture(scope="session")
def tiny_llama_dir(default_model_dir, tmp_path_factory) -> Path:
    """A 2-layer random Llama in HF layout with the default model's tokenizer."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_gptq_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """tiny_llama_dir quantized by `llmctl quantize` (4-bit, group 32), without its check."""
    from llmctl.config import GPTQConfig, QuantConfig
    from llmctl.quant.run import quantize_checkpoint

    out = tmp_path_factory.mktemp("tiny-q") / "tiny-gptq"
    quantize_checkpoint(tiny_llama_dir, out, QuantConfig(GPTQConfig(group_size=32), num_samples=2, seq_len=64),
                        device="cpu", run_eval=False)
    return out
