"""Prefill and throughput on one GPU, fp16 against GPTQ 4-bit, in one call (issue: prefill).

    python benchmarks/prefill_gpu.py --commit <sha>    # one H200: about 4.5-5.5 min; writes $OUT/prefill_gpu.txt
    python benchmarks/prefill_gpu.py --commit <sha> --num-prompts 500   # about a minute less
    python benchmarks/prefill_gpu.py --tiny             # the same code on the CPU, small (2-6 min)

Llama-3-8B shapes with random weights (`--load-format dummy`, recipes/llama3-8b.yaml), fp16
activations, prefix caching off. Each case runs in a fresh process and prints JSON lines; this
driver collects them and rewrites one text file (tables, then every JSON line) after each case, so
a run cut short still leaves what it measured.

1. gemm: the dense fp16 peak, cuBLAS `a @ b` at 8192^3 and at gate_up's shape for 8,192 tokens
   (8192 x 4096 x 28672), median of CUDA-event timings.
2. engine fp16 / engine gptq, one engine each:
   - the prefill graphs' memory pool and capture time with the default limit (2,048 tokens) and,
     captured again beside it, with the old limit (512);
   - time to first token at 16 / 256 / 1,024 / 4,096 prompt tokens, one request at a time, one
     output token (`LLM.generate` timed on the host, median of 5 after 2 warm-ups, a fresh random
     prompt each time), CUDA graphs on, then the same with the graphs detached (what
     enforce_eager runs);
   - the batch-1 decode step: (time of 129 output tokens - time of 1) / 128, 16-token prompt;
   - graph against eager: the greedy tokens of a 1,100-token prompt (padded to the 1,280 bucket);
   - `bench throughput`'s workload (llmctl.bench.throughput.run_llmctl): --num-prompts x 1,024 in
     / 128 out, max_num_seqs 256, 8,192 batched tokens, temperature 1; total tok/s and the
     TFLOP/s it implies (matmul FLOPs counted from the shapes: linears for every token fed, the LM
     head for every sampled row, causal attention), beside the gemm case's peak.
3. kernels: the W4A16 decode kernels' cache-hint variants (KernelConfig.EVICT, off by default)
   at M = 1 and 16 on the four Llama-3-8B shapes, group 128, on the path and config the table
   picks, against cuBLAS fp16 as `llmctl bench kernels` times them; every output NaN-poisoned and
   compared with the fp32 product of the same codes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECIPE_8B = str(ROOT / "recipes/llama3-8b.yaml")

FULL = {"model": RECIPE_8B, "lengths": [16, 256, 1024, 4096], "pad_len": 1100, "decode_tokens": 128,
        "input_len": 1024, "output_len": 128, "gemm": [[8192, 8192, 8192], [8192, 4096, 28672]],
        "engine": {"dtype": "float16", "enable_prefix_caching": False},
        "kernel_group": 128, "kernel_ms": [1, 16],
        "kernel_shapes": [["qkv", 6144, 4096], ["o", 4096, 4096], ["gate_up", 28672, 4096], ["down", 4096, 14336]]}
# The CPU stand-in: the embedded SmolLM2-135M shapes, short prompts, a small workload.
TINY = {"model": "default", "lengths": [16, 64], "pad_len": 40, "decode_tokens": 8,
        "input_len": 32, "output_len": 8, "gemm": [[256, 256, 256]],
        "engine": {"dtype": "float32", "enable_prefix_caching": False, "kv_cache_memory": "256MiB",
                   "max_num_seqs": 16, "max_num_batched_tokens": 512, "max_model_len": 512},
        "kernel_group": 64, "kernel_ms": [1, 16], "kernel_shapes": [["small", 80, 320], ["wide", 256, 128]]}


def emit(**row) -> None:
    print("RESULT " + json.dumps(row), flush=True)


# ---- cases (each in its own process) ---------------------------------------------------------
def case_gemm(shapes: list[list[int]]) -> None:
    import torch

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    for m, k, n in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        a = torch.randn(m, k, device=dev, dtype=dtype, generator=g)  # never zeros: they run faster
        b = torch.randn(k, n, device=dev, dtype=dtype, generator=g)
        out = a @ b
        ref = a[:64].double() @ b.double()
        err = ((out[:64].double() - ref).norm() / ref.norm()).item()
        times = []
        for _ in range(25):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                torch.matmul(a, b, out=out)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                torch.matmul(a, b, out=out)
                times.append(time.perf_counter() - t0)
        sec = statistics.median(times[5:])
        emit(case="gemm", m=m, k=k, n=n, dtype=str(dtype), seconds=sec, tflops=2 * m * k * n / sec / 1e12,
             rel_err=err, device=torch.cuda.get_device_name() if cuda else "cpu")


def matmul_flops_per_request(arch, input_len: int, output_len: int) -> float:
    """Matmul FLOPs of one request of the throughput workload: the linears for every token fed
    (the prompt and output_len - 1 decodes), the LM head for each of the output_len sampled rows,
    causal attention (QK^T and PV, 4 * q_dim FLOPs per key per layer) for every fed token."""
    d, i, layers = arch.hidden_size, arch.intermediate_size, arch.num_hidden_layers
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    fed = input_len + output_len - 1
    linears = 2 * layers * (d * (q + 2 * kv) + q * d + d * 2 * i + i * d) * fed
    head = 2 * d * arch.vocab_size * output_len
    keys = fed * (fed + 1) // 2  # token at position p attends p + 1 keys
    attention = 4 * q * layers * keys
    return float(linears + head + attention)


def _ttft_table(llm, lengths: list[int], rng: random.Random, label: str, quant: str) -> None:
    from llmctl.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    vocab = llm.vocab_size
    for n in lengths:
        times = []
        for rep in range(7):
            prompt = [rng.randrange(vocab) for _ in range(n)]
            t0 = time.perf_counter()
            llm.generate([prompt], params)
            if rep >= 2:
                times.append(time.perf_counter() - t0)
        emit(case="ttft", quant=quant, mode=label, prompt_tokens=n, median_ms=statistics.median(times) * 1e3,
             min_ms=min(times) * 1e3)


def _decode_step(llm, steps: int, rng: random.Random, quant: str) -> None:
    from llmctl.sampling_params import SamplingParams

    vocab = llm.vocab_size
    runs = {}
    for max_tokens in (1, steps + 1):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        times = []
        for rep in range(4):
            prompt = [rng.randrange(vocab) for _ in range(16)]
            t0 = time.perf_counter()
            out = llm.generate([prompt], params)
            if rep >= 1:
                times.append(time.perf_counter() - t0)
            assert len(out[0].outputs[0].token_ids) == max_tokens
        runs[max_tokens] = statistics.median(times)
    step = (runs[steps + 1] - runs[1]) / steps
    emit(case="decode", quant=quant, batch=1, step_ms=step * 1e3, tokens_per_s=1 / step)


def _graphs_match_eager(llm, runner, pad_len: int, rng: random.Random, quant: str) -> None:
    """Greedy tokens of one prompt whose length is no bucket, through the graphs and eagerly."""
    from llmctl.sampling_params import SamplingParams

    prompt = [rng.randrange(llm.vocab_size) for _ in range(pad_len)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    graphs = runner.decode_graphs, runner.prefill_graphs
    with_graphs = llm.generate([prompt], params)[0].outputs[0].token_ids
    replays = graphs[1].num_replays if graphs[1] is not None else None
    runner.decode_graphs = runner.prefill_graphs = None
    eager = llm.generate([prompt], params)[0].outputs[0].token_ids
    runner.decode_graphs, runner.prefill_graphs = graphs
    emit(case="graph_vs_eager", quant=quant, prompt_tokens=pad_len, graph_tokens=list(with_graphs),
         eager_tokens=list(eager), same_tokens=sum(a == b for a, b in zip(with_graphs, eager)),
         prefill_replays_after=replays)


def _old_limit_pool(llm, runner, quant: str) -> None:
    """Capture the prefill graphs again with the old 512-token limit, beside the engine's: their
    pool and capture time, the baseline of the default limit's."""
    import torch

    from llmctl.engine.prefill_graph import PrefillGraphs

    cfg = llm.engine.config
    old = PrefillGraphs(runner.model, runner.device, runner.block_size, llm.engine.max_model_len,
                        cfg.scheduler.max_num_batched_tokens, cfg.scheduler.max_num_seqs, 512)
    old.capture()
    emit(case="graph_pool", quant=quant, max_graph_tokens=old.max_tokens, graphs=len(old.graphs),
         capture_s=old.capture_seconds, pool_mib=old.pool_bytes / 2**20)
    del old
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def case_engine(quant: str, spec: dict, num_prompts: int) -> None:
    import torch

    from llmctl.bench.throughput import run_llmctl, sample_prompts
    from llmctl.config import BenchConfig
    from llmctl.llm import LLM

    t0 = time.perf_counter()
    kwargs = dict(spec["engine"], quantization=None if quant == "fp16" else quant)
    llm = LLM(spec["model"], load_format="dummy", **kwargs)
    runner = llm.engine.runner
    cuda = runner.device.type == "cuda"
    prefill, decode = runner.prefill_graphs, runner.decode_graphs
    plan = llm.engine.kv_plan
    emit(case="engine_start", quant=quant, seconds=time.perf_counter() - t0, kv_blocks=plan.num_blocks,
         activation_mib=plan.activation_bytes / 2**20, graph_estimate_mib=plan.graph_bytes / 2**20,
         decode_capture_s=decode.capture_seconds if decode else None,
         decode_pool_mib=decode.pool_bytes / 2**20 if decode else None,
         device=torch.cuda.get_device_name() if cuda else "cpu")
    if prefill is not None:
        emit(case="graph_pool", quant=quant, max_graph_tokens=prefill.max_tokens, graphs=len(prefill.graphs),
             capture_s=prefill.capture_seconds, pool_mib=prefill.pool_bytes / 2**20, token_sizes=prefill.token_sizes)
        _old_limit_pool(llm, runner, quant)
    rng = random.Random(1234)
    _ttft_table(llm, spec["lengths"], rng, "graphs" if cuda else "cpu", quant)
    _decode_step(llm, spec["decode_tokens"], rng, quant)
    _graphs_match_eager(llm, runner, spec["pad_len"], rng, quant)
    if cuda:  # the graphs detached: every step eager, as enforce_eager runs
        runner.decode_graphs = runner.prefill_graphs = None
        _ttft_table(llm, spec["lengths"], rng, "eager", quant)
        runner.decode_graphs, runner.prefill_graphs = decode, prefill
    bench = BenchConfig(num_prompts=num_prompts, input_len=spec["input_len"], output_len=spec["output_len"])
    prompts = sample_prompts(bench, llm.vocab_size)
    result = run_llmctl(llm, prompts, bench, lambda *_: None)
    flops = matmul_flops_per_request(llm.engine.arch, bench.input_len, bench.output_len) * result.num_requests
    emit(case="throughput", quant=quant, **result.to_dict(), engine_tflops=flops / result.elapsed_s / 1e12,
         gflop_per_token_exact=flops / (result.num_prompt_tokens + result.num_output_tokens) / 1e9,
         gflop_per_token_2p=2 * llm.engine.arch.num_params() / 1e9)
    llm.shutdown()


def case_kernels(spec: dict) -> None:
    """The decode-kernel cache-hint variants (KernelConfig.EVICT: 0 as tuned, 1 x evict_last, 2 no
    hint), each on the path and config the table picks, against cuBLAS fp16, timed as `llmctl
    bench kernels` times them (CUDA-graph replays over rotated weights); variant 0 twice (noise).
    On the CPU (under TRITON_INTERPRET) correctness only."""
    import dataclasses
    import functools

    import torch
    import torch.nn.functional as F

    from llmctl.bench.kernels import _w4a16_bytes, measure_copy_bandwidth
    from llmctl_kernels.w4a16 import select_path, w4a16_dequantize, w4a16_matmul
    from llmctl_kernels.w4a16.tune import layer_bytes, num_rotations, random_layer, time_graph_ms

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    group = spec["kernel_group"]
    copy_gbps = measure_copy_bandwidth(device) if cuda else None
    for name, n, k in spec["kernel_shapes"]:
        first = random_layer(n, k, group, False, device, seed=100)
        count = num_rotations(layer_bytes(first), device) if cuda else 1
        plain = [first] + [random_layer(n, k, group, False, device, seed=100 + i) for i in range(1, count)]
        dense32 = w4a16_dequantize(first, torch.float32)  # [K, N]
        dense = ([w4a16_dequantize(w, torch.float16).t().contiguous() for w in plain[:num_rotations(2 * k * n, device)]]
                 if cuda else [])
        for m in spec["kernel_ms"]:
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            ref = x.float() @ dense32
            path, config = select_path(m, n, k, device, first.layout)
            fp16_us = time_graph_ms([functools.partial(F.linear, x, d) for d in dense]) * 1e3 if cuda else None
            for evict in (0, 1, 2, 0):
                cfg = dataclasses.replace(config, EVICT=evict)
                out = torch.full((m, n), float("nan"), device=device, dtype=torch.float16)
                try:
                    w4a16_matmul(x, first, path=path, config=cfg, out=out)
                except Exception as err:  # a variant the compiler rejects: said, and the others still run
                    emit(case="kernel_error", shape=name, m=m, evict=evict, error=f"{type(err).__name__}: {str(err)[:300]}")
                    continue
                rel_err = float((out.float() - ref).norm() / ref.norm())
                us = None
                if cuda:
                    fns = [functools.partial(w4a16_matmul, x, w, path=path, config=cfg) for w in plain]
                    us = time_graph_ms(fns) * 1e3
                emit(case="kernel", shape=name, n=n, k=k, m=m, path=path, evict=evict, rel_err=rel_err,
                     nan=bool(torch.isnan(out).any()), us=us, fp16_us=fp16_us,
                     speedup=fp16_us / us if cuda else None,
                     bw_share=_w4a16_bytes(m, k, n, group, False) / (us * 1e-6) / 1e9 / copy_gbps if cuda else None)
        del plain, dense, dense32
        if cuda:
            torch.cuda.empty_cache()


# ---- driver ----------------------------------------------------------------------------------
def run_case(args: list[str], timeout: float, env: dict | None = None) -> tuple[list[dict], str]:
    cmd = [sys.executable, __file__, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env={**os.environ, **(env or {})})
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, rc = f"timed out after {timeout:.0f} s", "timeout"
    rows = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    note = "" if rc == 0 else f"case {' '.join(args)}: exit {rc}\n{(err or '')[-3000:]}"
    return rows, note


def _fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def report(rows: list[dict], notes: list[str], meta: dict) -> str:
    lines = [f"# prefill_gpu  {json.dumps(meta)}", ""]
    get = lambda **kw: [r for r in rows if all(r.get(k) == v for k, v in kw.items())]
    peak = max((r["tflops"] for r in get(case="gemm")), default=None)
    for r in get(case="gemm"):
        lines.append(f"gemm {r['m']}x{r['k']}x{r['n']} {r['dtype']}: {r['seconds'] * 1e3:.3f} ms, "
                     f"{r['tflops']:.1f} TFLOP/s (rel err {r['rel_err']:.1e}) on {r['device']}")
    for r in get(case="engine_start"):
        lines.append(f"engine {r['quant']}: start {r['seconds']:.1f} s, {r['kv_blocks']} KV blocks, "
                     f"activation {r['activation_mib']:.0f} MiB, graphs planned {r['graph_estimate_mib']:.0f} MiB, "
                     f"decode capture {_fmt(r['decode_capture_s'], '.1f')} s, pool {_fmt(r['decode_pool_mib'], '.0f')} MiB")
    for r in get(case="graph_pool"):
        lines.append(f"prefill graphs {r['quant']} up to {r['max_graph_tokens']} tokens: {r['graphs']} graphs, "
                     f"capture {r['capture_s']:.1f} s, pool {r['pool_mib']:.0f} MiB")
    lines += ["", "TTFT ms (median of 5), one request, 1 output token",
              "| prompt tokens | fp16 eager | fp16 graphs | GPTQ eager | GPTQ graphs | GPTQ / fp16 (graphs) |",
              "|---|---|---|---|---|---|"]
    lengths = sorted({r["prompt_tokens"] for r in get(case="ttft")})
    for n in lengths:
        cell = {(q, mode): None for q in ("fp16", "gptq") for mode in ("eager", "graphs")}
        for r in get(case="ttft", prompt_tokens=n):  # the CPU's rows ("cpu") fill the graphs column
            cell[r["quant"], "eager" if r["mode"] == "eager" else "graphs"] = r["median_ms"]
        ratio = (cell["gptq", "graphs"] / cell["fp16", "graphs"]
                 if cell["gptq", "graphs"] and cell["fp16", "graphs"] else None)
        lines.append(f"| {n:,} | {_fmt(cell['fp16', 'eager'])} | {_fmt(cell['fp16', 'graphs'])} | "
                     f"{_fmt(cell['gptq', 'eager'])} | {_fmt(cell['gptq', 'graphs'])} | {_fmt(ratio)} |")
    for r in get(case="decode"):
        lines.append(f"decode step batch 1, {r['quant']}: {r['step_ms']:.3f} ms ({r['tokens_per_s']:.1f} tok/s)")
    for r in get(case="graph_vs_eager"):
        lines.append(f"graph vs eager {r['quant']}, {r['prompt_tokens']}-token prompt: {r['same_tokens']}/"
                     f"{len(r['graph_tokens'])} greedy tokens equal")
    lines += ["", "throughput (bench throughput workload)"]
    tput = {r["quant"]: r for r in get(case="throughput")}
    for q, r in tput.items():
        share = f", {r['engine_tflops'] / peak:.1%} of the GEMM peak" if peak else ""
        lines.append(f"{q}: {r['num_requests']} requests in {r['elapsed_s']:.1f} s, {r['total_token_throughput']:,.0f} "
                     f"total tok/s, {r['output_throughput']:,.0f} output tok/s, engine {r['engine_tflops']:.1f} TFLOP/s "
                     f"({r['gflop_per_token_exact']:.2f} GFLOP/token counted; at 2 x params = "
                     f"{r['gflop_per_token_2p']:.2f}: {r['total_token_throughput'] * r['gflop_per_token_2p'] / 1e3:.1f} "
                     f"TFLOP/s){share}; {r['extra'].get('num_steps')} steps, "
                     f"{r['extra'].get('num_preemptions')} preemptions")
    if "fp16" in tput and "gptq" in tput:
        lines.append(f"GPTQ / fp16 total tok/s: {tput['gptq']['total_token_throughput'] / tput['fp16']['total_token_throughput']:.3f}")
    kern = get(case="kernel")
    if kern:
        lines += ["", "decode kernels, cache hints (EVICT 0 as tuned / 1 x evict_last / 2 none / 0 again): "
                  "us and speedup over cuBLAS fp16",
                  "| shape | M | path | cuBLAS | EVICT 0 | 1 | 2 | 0 again | worst rel err |", "|---|---|---|---|---|---|---|---|---|"]
        for key in sorted({(r["shape"], r["m"]) for r in kern}, key=lambda t: (t[1], t[0])):
            rs = [r for r in kern if (r["shape"], r["m"]) == key]
            if len(rs) != 4:
                continue
            cells = [f"{_fmt(r['us'], '.1f')} ({_fmt(r['speedup'])}x)" for r in rs]
            worst = max(r["rel_err"] for r in rs)
            bad = " NaN!" if any(r["nan"] for r in rs) else ""
            lines.append(f"| {key[0]} | {key[1]} | {rs[0]['path']} | {_fmt(rs[0]['fp16_us'], '.1f')} | "
                         + " | ".join(cells) + f" | {worst:.1e}{bad} |")
        for m in sorted({r["m"] for r in kern}):
            runs = [[r for r in kern if (r["shape"], r["m"]) == (shape, m)] for shape in sorted({r["shape"] for r in kern})]
            runs = [rs for rs in runs if len(rs) == 4]  # the shapes where every variant ran
            geo = []
            for pos in range(4):
                sp = [rs[pos]["speedup"] for rs in runs]
                geo.append(statistics.geometric_mean(sp) if sp and all(sp) else None)
            lines.append(f"M={m} geomean speedup, EVICT 0 / 1 / 2 / 0 again: " + " / ".join(_fmt(g) for g in geo))
    for r in get(case="kernel_error"):
        lines.append(f"kernel variant failed: {r['shape']} M={r['m']} EVICT {r['evict']}: {r['error']}")
    lines += ["", *notes, "", "raw:", *(json.dumps(r) for r in rows)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the CPU stand-in (small model, short prompts)")
    ap.add_argument("--num-prompts", type=int, default=None, help="throughput requests (1000; --tiny: 8)")
    ap.add_argument("--output", default=None, help="default: $OUT/prefill_gpu.txt, else ./prefill_gpu.txt")
    ap.add_argument("--commit", default=os.environ.get("LLMCTL_COMMIT", ""), help="the commit that runs (for the record)")
    ap.add_argument("--only", default="gemm,fp16,gptq,kernels", help="cases to run, comma-separated")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    spec = TINY if args.tiny else FULL
    num_prompts = args.num_prompts or (8 if args.tiny else 1000)
    if args.case == "gemm":
        return case_gemm(spec["gemm"])
    if args.case == "kernels":
        return case_kernels(spec)
    if args.case is not None:
        return case_engine(args.case, spec, num_prompts)
    out = Path(args.output or Path(os.environ.get("OUT", ".")) / "prefill_gpu.txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    commit = args.commit
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=ROOT).stdout.strip() + " (git here; may be stale)"
        except OSError:
            commit = "?"
    meta = {"commit": commit, "tiny": args.tiny, "num_prompts": num_prompts}
    rows, notes = [], []
    extra = ["--tiny"] if args.tiny else []
    start = time.perf_counter()
    for case in args.only.split(","):
        t0 = time.perf_counter()
        # the kernels under the Triton interpreter where there is no GPU (--tiny)
        env = {"TRITON_INTERPRET": "1"} if args.tiny and case == "kernels" else None
        got, note = run_case(["--case", case, "--num-prompts", str(num_prompts), *extra], timeout=420, env=env)
        rows += got
        notes += [f"case {case}: {time.perf_counter() - t0:.1f} s"] + ([note] if note else [])
        meta["seconds"] = round(time.perf_counter() - start, 1)
        out.write_text(report(rows, notes, meta))
    text = out.read_text()
    print(text[:text.index("\nraw:")] if "\nraw:" in text else text)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
