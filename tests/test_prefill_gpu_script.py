"""benchmarks/prefill_gpu.py's arithmetic and report, on made-up rows covering every GPU-only
branch (eager column, graph pools, both throughput rows, the GEMM peak): the GPU run must not die
on a formatting slip. The whole script runs on the CPU with --tiny (slow marker)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks/prefill_gpu.py"


def _module():
    spec = importlib.util.spec_from_file_location("prefill_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_matmul_flops_of_llama3_8b_request():
    """One 1,024-in / 128-out request: 1,151 fed tokens through 6.98 B linear weights (2 FLOPs
    each), 128 LM-head rows, causal attention over 1,151 positions."""
    from llmctl.models.arch import arch_from_config
    from llmctl.recipe import load_recipe

    mod = _module()
    arch = arch_from_config(load_recipe(str(ROOT / "recipes/llama3-8b.yaml")).model.arch)
    flops = mod.matmul_flops_per_request(arch, 1024, 128)
    linear_per_token = 2 * 32 * (4096 * 6144 + 4096 * 4096 + 4096 * 28672 + 14336 * 4096)
    assert linear_per_token == pytest.approx(13.96e9, rel=1e-3)
    expected = linear_per_token * 1151 + 2 * 4096 * 128256 * 128 + 4 * 4096 * 32 * (1151 * 1152 // 2)
    assert flops == expected
    assert 14.0e9 < flops / 1152 < 14.6e9  # below 2 x params (16.06 GFLOP): embeddings are lookups


def test_report_has_every_table_row():
    mod = _module()
    rows = [
        dict(case="gemm", m=8192, k=8192, n=8192, dtype="torch.float16", seconds=1.5e-3, tflops=733.0, rel_err=3e-4,
             device="H200"),
        dict(case="engine_start", quant="fp16", seconds=30.0, kv_blocks=55000, activation_mib=1200.0,
             graph_estimate_mib=1448.0, decode_capture_s=4.0, decode_pool_mib=1150.0, device="H200"),
        dict(case="graph_pool", quant="fp16", max_graph_tokens=2048, graphs=48, capture_s=9.0, pool_mib=400.0),
        dict(case="graph_pool", quant="fp16", max_graph_tokens=512, graphs=24, capture_s=5.0, pool_mib=120.0),
        *[dict(case="ttft", quant=q, mode=m, prompt_tokens=n, median_ms=v, min_ms=v)
          for q, m, n, v in [("fp16", "graphs", 1024, 24.0), ("fp16", "eager", 1024, 31.0),
                             ("gptq", "graphs", 1024, 27.0), ("gptq", "eager", 1024, 39.0),
                             ("fp16", "graphs", 16, 5.0)]],
        dict(case="decode", quant="gptq", batch=1, step_ms=3.0, tokens_per_s=333.3),
        dict(case="graph_vs_eager", quant="gptq", prompt_tokens=1100, graph_tokens=[1, 2], eager_tokens=[1, 3],
             same_tokens=1, prefill_replays_after=5),
        *[dict(case="throughput", quant=q, backend="llmctl", num_requests=1000, elapsed_s=s, num_prompt_tokens=1024000,
               num_output_tokens=128000, extra={"num_steps": 600, "num_preemptions": 0}, requests_per_second=1000 / s,
               output_throughput=128000 / s, total_token_throughput=1152000 / s, engine_tflops=1000 * 16.5e3 / s / 1e3,
               gflop_per_token_exact=14.3, gflop_per_token_2p=16.06) for q, s in [("fp16", 40.0), ("gptq", 32.0)]],
    ]
    text = mod.report(rows, ["case fp16: 100 s"], {"commit": "abc"})
    assert "| 1,024 | 31.00 | 24.00 | 39.00 | 27.00 | 1.12 |" in text
    assert "| 16 | - | 5.00 | - | - | - |" in text
    assert "pool 400 MiB" in text and "up to 512 tokens: 24 graphs" in text
    assert "graphs planned 1448 MiB, decode capture 4.0 s, pool 1150 MiB" in text
    assert "GPTQ / fp16 total tok/s: 1.250" in text
    assert "of the GEMM peak" in text and "1/2 greedy tokens equal" in text
    assert text.count("{") >= len(rows)  # the raw rows follow the tables


def test_report_kernel_variants_table():
    mod = _module()
    rows = [dict(case="kernel", shape=name, n=4096, k=4096, m=m, path="gemm", evict=e, rel_err=4e-4, nan=False,
                 us=us, fp16_us=14.0, speedup=14.0 / us, bw_share=0.4)
            for m in (1, 16) for name in ("o", "qkv") for e, us in zip((0, 1, 2, 0), (7.0, 6.5, 7.5, 7.0))]
    text = mod.report(rows, [], {})
    assert "| o | 1 | gemm | 14.0 | 7.0 (2.00x) | 6.5 (2.15x) | 7.5 (1.87x) | 7.0 (2.00x) | 4.0e-04 |" in text
    assert "M=16 geomean speedup, EVICT 0 / 1 / 2 / 0 again: 2.00 / 2.15 / 1.87 / 2.00" in text
    # a variant the compiler rejected: named, its shape left out of the table and the geomean
    failed = [r for r in rows if not (r["shape"] == "o" and r["m"] == 1 and r["evict"] == 1)]
    failed.append(dict(case="kernel_error", shape="o", m=1, evict=1, error="CompilationError: x"))
    text = mod.report(failed, [], {})
    assert "kernel variant failed: o M=1 EVICT 1: CompilationError: x" in text
    assert "| o | 1 |" not in text and "| qkv | 1 |" in text
    assert "M=1 geomean speedup, EVICT 0 / 1 / 2 / 0 again: 2.00 / 2.15 / 1.87 / 2.00" in text


@pytest.mark.slow
def test_tiny_run_on_the_cpu(tmp_path):
    """Every case of the script end to end at the embedded model's shapes (about 5 minutes on a
    busy 2-core machine)."""
    out = tmp_path / "p.txt"
    subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--num-prompts", "4", "--output", str(out)],
                   check=True, timeout=1200, cwd=ROOT)
    text = out.read_text()
    assert "exit" not in text.split("raw:")[0]
    assert "GPTQ / fp16 total tok/s" in text and "greedy tokens equal" in text
