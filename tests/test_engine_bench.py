"""`llmctl bench throughput` plumbing on a tiny random-weight model (fast), and its prompts."""

from __future__ import annotations

import json

import pytest

from llmctl.config import BenchConfig

TINY_RECIPE = """
name: tiny
model:
  path: ./nowhere
  dtype: float32
  max_model_len: 128
  arch:
    architectures: [LlamaForCausalLM]
    vocab_size: 512
    hidden_size: 64
    intermediate_size: 128
    num_hidden_layers: 2
    num_attention_heads: 4
    num_key_value_heads: 2
    head_dim: 16
    max_position_embeddings: 128
    torch_dtype: float32
cache:
  kv_cache_memory: 4MiB
scheduler:
  max_num_seqs: 8
  max_num_batched_tokens: 64
bench:
  num_prompts: 12
  input_len: 20
  output_len: 10
"""


@pytest.fixture()
def tiny_recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    return str(path)


def test_every_backend_runs_the_same_workload(tiny_recipe):
    from llmctl.bench.throughput import run_throughput, summary_rows
    from llmctl.cli.bench_throughput import throughput_settings

    settings = throughput_settings(tiny_recipe, n=2, device="cpu")
    config, bench = settings.engine, settings.bench
    assert (bench.num_prompts, bench.input_len, bench.output_len, bench.n) == (12, 20, 10, 2)
    assert config.scheduler.max_num_seqs == 8 and config.cache.kv_cache_memory == 4 << 20
    events = []
    report = run_throughput(config, bench, ("llmctl", "hf", "hf-sequential"), hf_batch_size=5,
                            load_format="dummy", on_event=lambda *e: events.append(e))
    results = {r["backend"]: r for r in report["results"]}
    assert set(results) == {"llmctl", "hf", "hf-sequential"}
    for r in results.values():
        assert r["num_prompt_tokens"] == 12 * 20
        assert r["num_output_tokens"] == 12 * 2 * 10
        assert r["output_throughput"] == pytest.approx(r["num_output_tokens"] / r["elapsed_s"])
    assert results["llmctl"]["extra"]["max_num_running"] <= 8
    assert sum(e[2]["n"] for e in events if e[:2] == ("llmctl", "advance")) == 12
    assert any(e[1] == "kv_plan" for e in events)
    rows = {r["backend"]: r for r in summary_rows(report)}
    assert "x_hf-sequential" in rows["llmctl"] and "x_hf" in rows["llmctl"]
    assert report["environment"]["commit"] is None or len(report["environment"]["commit"]) >= 7


def test_cli_json_and_output_file(tiny_recipe, tmp_path):
    from typer.testing import CliRunner

    from llmctl.cli.main import app

    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["bench", "throughput", "--model", tiny_recipe, "--load-format", "dummy",
                                   "--num-prompts", "3", "--output-len", "4", "--json", "--output-json", str(out)])
    assert res.exit_code == 0, res.output
    saved = json.loads(out.read_text())
    assert saved["config"]["num_prompts"] == 3 and saved["results"][0]["num_output_tokens"] == 12
    res = CliRunner().invoke(app, ["bench", "throughput", "--model", tiny_recipe, "--backend", "vllm"])
    assert res.exit_code != 0 and "--backend" in str(res.exception)


def test_random_prompts_are_exact_length_seeded_and_skip_special_tokens():
    from llmctl.bench.throughput import sample_prompts

    class Tok:
        all_special_ids = [0, 1, 2]

    bench = BenchConfig(num_prompts=5, input_len=300, seed=3)
    a = sample_prompts(bench, 50, Tok())
    assert a == sample_prompts(bench, 50, Tok()) != sample_prompts(BenchConfig(num_prompts=5, input_len=300, seed=4), 50, Tok())
    assert all(len(p) == 300 for p in a)
    assert min(min(p) for p in a) == 3 and max(max(p) for p in a) == 49


def test_corpus_prompts_are_consecutive_windows_of_the_corpus(default_model_dir):
    from llmctl.bench.throughput import sample_prompts
    from llmctl.errors import ConfigError
    from llmctl.models.loader import load_tokenizer

    tok = load_tokenizer(default_model_dir)
    prompts = sample_prompts(BenchConfig(num_prompts=4, input_len=64, dataset="corpus"), 49152, tok)
    assert [len(p) for p in prompts] == [64] * 4
    assert len(tok.decode(prompts[0]).split()) > 20  # real text, not random ids
    with pytest.raises(ConfigError, match="tokenizer"):
        sample_prompts(BenchConfig(dataset="corpus"), 49152, None)


def test_dummy_weights_are_seeded_and_finite():
    import torch
    import yaml

    from llmctl.models.arch import arch_from_config
    from llmctl.models.dummy import load_dummy_model

    arch = arch_from_config(yaml.safe_load(TINY_RECIPE)["model"]["arch"])
    a = load_dummy_model(arch, torch.float16, "cpu", seed=1)
    b = load_dummy_model(arch, torch.float16, "cpu", seed=1)
    ids = torch.randint(0, 512, (1, 32))
    logits = a.logits(ids)
    assert torch.isfinite(logits).all() and logits.std() > 0
    assert torch.equal(logits, b.logits(ids))


def test_dummy_gptq_weights_load_as_a_gptq_model_and_bench_through_the_cli(tiny_recipe, tmp_path):
    import torch
    import yaml
    from typer.testing import CliRunner

    from llmctl.cli.main import app
    from llmctl.models.arch import arch_from_config
    from llmctl.models.dummy import load_dummy_model, with_quantization

    arch = with_quantization(arch_from_config(yaml.safe_load(TINY_RECIPE)["model"]["arch"]), "gptq")
    assert arch.is_gptq and arch.quantization.bits == 4
    assert arch.quantization.group_size == -1  # 64 is not a multiple of 128
    model = load_dummy_model(arch, torch.float32, "cpu", seed=3)
    layer = model.model.layers[0].mlp.gate_up_proj
    assert layer.qweight.dtype == torch.int32 and not hasattr(layer, "weight")
    # On the CPU the random codes are dequantized once at load: (code - zero) levels, not a constant.
    assert layer.dense_weight.unique().numel() > 8 and layer.qweight.numel() == 0
    logits = model.logits(torch.randint(0, 512, (1, 16)))
    assert torch.isfinite(logits).all() and logits.std() > 0

    out = tmp_path / "q.json"
    res = CliRunner().invoke(app, ["bench", "throughput", "--model", tiny_recipe, "--load-format", "dummy",
                                   "--quantization", "gptq", "--num-prompts", "3", "--output-len", "4",
                                   "--baseline", tiny_recipe, "--output-json", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["quantization"] == "gptq" and report["results"][0]["num_output_tokens"] == 12
    # --baseline: the dense model of the same shapes, same prompts, in the same run
    assert report["baseline"] == tiny_recipe and [r["backend"] for r in report["results"]] == ["llmctl", "baseline"]
    assert report["results"][1]["num_output_tokens"] == 12 and "x baseline" in res.stdout
    res = CliRunner().invoke(app, ["bench", "throughput", "--model", tiny_recipe, "--quantization", "gptq"])
    assert res.exit_code != 0 and "--load-format dummy" in str(res.exception)
    res = CliRunner().invoke(app, ["bench", "throughput", "--model", tiny_recipe, "--load-format", "dummy",
                                   "--quantization", "gptq", "--backend", "all"])
    assert res.exit_code != 0 and "dense" in str(res.exception)


def test_third_party_progress_bars_only_with_llmctl_debug(default_model_dir):
    import os
    import subprocess
    import sys

    def run(debug: bool) -> str:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for name in ("LLMCTL_DEBUG", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS",
                     "TRANSFORMERS_VERBOSITY"):
            env.pop(name, None)  # an in-process CLI test may have set them here
        if debug:
            env["LLMCTL_DEBUG"] = "1"
        res = subprocess.run([sys.executable, "-m", "llmctl", "bench", "throughput", "--model", str(default_model_dir),
                              "--backend", "hf", "--num-prompts", "1", "--input-len", "4", "--output-len", "2"],
                             capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stderr
        return res.stderr

    assert "it/s]" not in run(debug=False)
    assert "Loading weights" in run(debug=True)  # transformers' own bar, kept for debugging


def test_dummy_gptq_weights_are_centred_on_the_symmetric_zero_point():
    """Dummy GPTQ weights have the dense dummy's spread and no common offset: uniform codes 0..15
    around the zero 8 gave every weight a mean of -0.5 steps, which a Llama-3-8B's widths amplify
    layer after layer until its fp16 logits are NaN; random zero points gave each group and column
    an offset of up to 7.5 steps."""
    import torch

    from llmctl.models.arch import arch_from_config
    from llmctl.models.dummy import load_dummy_model, with_quantization

    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 256,
           "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 64}
    arch = with_quantization(arch_from_config(cfg), "gptq")
    model = load_dummy_model(arch, torch.float32, "cpu", seed=0)
    checked = 0
    for name, module in model.named_modules():
        if getattr(module, "dense_weight", None) is not None:
            w = module.dense_weight.float()  # [N, K]
            step = w.abs()[w != 0].min()  # one quantization step: the codes next to the zero
            assert abs(w.std().item() - 0.02) < 0.001, name
            # the mean over all weights: 0 within a few standard errors (4.3 steps / sqrt(n))
            assert w.mean().abs() < 4 * 4.3 * step / w.numel() ** 0.5, name
            groups = w.reshape(w.shape[0], -1, arch.quantization.group_size).mean(-1)
            assert groups.abs().max() < 2.5 * step, name  # a group's mean: 0 +- 0.38 steps
            checked += 1
    assert checked == 8  # qkv, o, gate_up, down in each of the two layers
