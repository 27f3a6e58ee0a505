"""Tensor parallelism on two GPUs: correctness, speed, capacity and a fault, in one call.

    python benchmarks/tp_two_gpu.py --output tp.json            # everything (needs 2 GPUs)
    python benchmarks/tp_two_gpu.py --only decode --tp 1        # the TP=1 decode table alone (1 GPU)

Every case runs in a fresh process (one engine each, so NCCL groups, graphs and memory never
leak between cases) and prints one JSON line; this driver collects them, prints markdown tables
for docs/benchmarks.md and writes them all to --output with the device and commit.

1. correctness: a Llama-3-8B-shaped checkpoint with random weights (4 layers, written once to a
   temp dir, fp16 and GPTQ 4-bit g128), TP=2 greedy vs TP=1 token for token, CUDA graphs on and off;
   the decode graphs' replay count shows the all-reduce was captured (a replay is the whole step).
2. speed: engine decode step at batch 1/8/32, TP=1 and TP=2, fp16 and GPTQ (Llama-3-8B shapes,
   --load-format dummy); offline throughput 1000 x 1024 in / 128 out; the share of the step one
   layer's two all-reduces take, timed alone in a CUDA graph on both GPUs.
3. capacity: Llama-3-70B shapes in fp16 (141 GB) at TP=2: `llmctl plan` beside what each rank
   allocated, and decode tok/s at batch 1 and 32.
4. fault: rank 1 killed mid-generation: the error names it, no process is left.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE_8B, RECIPE_70B = str(ROOT / "recipes/llama3-8b.yaml"), str(ROOT / "recipes/llama3-70b.yaml")


# ---- cases (each runs in its own process) --------------------------------------------------
def _llm(model: str, tp: int, **kw):
    from llmctl.llm import LLM

    return LLM(model, tensor_parallel_size=tp, dtype="float16", **kw)


def case_write_checkpoint(out: str, quant: bool) -> dict:
    """Llama-3-8B widths, 4 layers, random weights, written as safetensors (dense or GPTQ g128)."""
    import torch
    from safetensors.torch import save_file

    from llmctl.recipe import load_recipe

    arch = load_recipe(RECIPE_8B).model.arch
    cfg = {**arch, "num_hidden_layers": 4, "torch_dtype": "float16"}
    g = torch.Generator().manual_seed(0)
    d, inter, dh = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * dh, cfg["num_key_value_heads"] * dh
    shapes = {"self_attn.q_proj": (d, q), "self_attn.k_proj": (d, kv), "self_attn.v_proj": (d, kv),
              "self_attn.o_proj": (q, d), "mlp.gate_proj": (d, inter), "mlp.up_proj": (d, inter),
              "mlp.down_proj": (inter, d)}
    t: dict = {"model.embed_tokens.weight": (torch.randn(cfg["vocab_size"], d, generator=g) * 0.02).half(),
               "lm_head.weight": (torch.randn(cfg["vocab_size"], d, generator=g) * 0.05).half(),
               "model.norm.weight": torch.ones(d, dtype=torch.float16)}
    for i in range(cfg["num_hidden_layers"]):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            t[f"model.layers.{i}.{norm}.weight"] = torch.ones(d, dtype=torch.float16)
        for name, (k, n) in shapes.items():
            pre = f"model.layers.{i}.{name}"
            if not quant:
                t[f"{pre}.weight"] = (torch.randn(n, k, generator=g) * 0.02).half()
                continue
            ints = lambda *s: torch.randint(-2**31, 2**31 - 1, s, generator=g, dtype=torch.int64).to(torch.int32)
            t[f"{pre}.qweight"], t[f"{pre}.qzeros"] = ints(k // 8, n), ints(k // 128, n // 8)
            t[f"{pre}.scales"] = torch.full((k // 128, n), 0.02 / 4.6, dtype=torch.float16)
            t[f"{pre}.g_idx"] = torch.arange(k, dtype=torch.int32) // 128
    if quant:
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
                                      "sym": True, "checkpoint_format": "gptq"}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "config.json").write_text(json.dumps(cfg))
    save_file(t, str(Path(out) / "model.safetensors"))
    _write_tokenizer(out, cfg["vocab_size"])
    return {"dir": out}


def _write_tokenizer(out: str, vocab_size: int) -> None:
    """A word-level tokenizer with one token per id (the engine detokenizes what it generates)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t128001").save_pretrained(out)


def case_correctness(model_dir: str, tp: int, eager: bool) -> dict:
    from llmctl.sampling_params import SamplingParams

    llm = _llm(model_dir, tp, enforce_eager=eager, max_model_len=512)
    prompts = [[(17 * i + 31 * j) % 128000 + 100 for j in range(48 + 8 * i)] for i in range(4)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    graphs = llm.engine.runner.decode_graphs
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
              "decode_replays": graphs.num_replays if graphs is not None else 0}
    llm.shutdown()
    return result


def _decode_step_ms(llm, batch: int, steps: int = 128, repeats: int = 3) -> float:
    """Wall time per decode step with `batch` sequences of 128-token prompts (median of repeats)."""
    from llmctl.sampling_params import SamplingParams

    engine, times = llm.engine, []
    for r in range(repeats + 1):  # the first round warms up
        params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"b{batch}-{r}-{i}", [(i * 131 + r * 7 + j) % 30000 + 10 for j in range(128)], params)
        while engine.get_stats().num_running < batch or any(  # until every prompt has prefilled
                s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running):
            engine.step()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        times.append((time.perf_counter() - start) / steps * 1e3)
        engine.abort_request([f"b{batch}-{r}-{i}" for i in range(batch)])
        engine.block_manager.reset_prefix_cache()
    times = sorted(times[1:])
    return times[len(times) // 2]


def case_decode(model: str, tp: int, quant: bool, batches: list[int]) -> dict:
    kw = {"quantization": "gptq"} if quant else {}
    llm = _llm(model, tp, load_format="dummy", max_num_seqs=max(batches), max_model_len=1024, **kw)
    rows = {b: _decode_step_ms(llm, b) for b in batches}
    memory = llm.engine.runner.memory_per_rank()
    plan = llm.engine.kv_plan.to_dict()
    llm.shutdown()
    return {"step_ms": rows, "tok_s": {b: b * 1e3 / ms for b, ms in rows.items()}, "memory": memory, "plan": plan}


def case_throughput(tp: int) -> dict:
    from llmctl.bench.throughput import run_throughput
    from llmctl.cli.bench_throughput import throughput_settings

    settings = throughput_settings(RECIPE_8B, num_prompts=1000, input_len=1024, output_len=128, dtype="float16",
                                   tensor_parallel_size=tp)
    report = run_throughput(settings.engine, settings.bench, ("llmctl",), 64, load_format="dummy")
    return report["results"][0]


def _allreduce_rank(rank: int, port: int, batches: list[int], hidden: int, per_step: int, out) -> None:
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    result = {}
    for b in batches:
        x = torch.randn(b, hidden, dtype=torch.float16, device="cuda")
        for _ in range(3):
            dist.all_reduce(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(per_step):
                dist.all_reduce(x)
        graph.replay()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            graph.replay()
        torch.cuda.synchronize()
        result[b] = (time.perf_counter() - start) / 20 * 1e3
    if rank == 0:
        out.put(result)
    dist.destroy_process_group()


def case_allreduce(batches: list[int]) -> dict:
    """The all-reduces of one Llama-3-8B decode step (2 per layer x 32, [B, 4096] fp16), alone."""
    import multiprocessing as mp

    from llmctl.engine.distributed import Rendezvous

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), Rendezvous.local(2).port
    procs = [ctx.Process(target=_allreduce_rank, args=(r, port, batches, 4096, 64, queue)) for r in range(2)]
    for p in procs:
        p.start()
    result = queue.get(timeout=300)
    for p in procs:
        p.join()
    return {"step_allreduce_ms": result}


def case_fault() -> dict:
    from llmctl.engine.distributed import TensorParallelError
    from llmctl.sampling_params import SamplingParams

    llm = _llm(RECIPE_8B, 2, load_format="dummy", max_model_len=1024)
    procs = list(llm.engine.tp_runtime.workers.procs.values())
    threading.Timer(2.0, os.kill, (procs[0].pid, signal.SIGKILL)).start()
    start, message = time.perf_counter(), None
    try:
        llm.generate([[100 + i for i in range(64)]], SamplingParams(max_tokens=100000 // 100, ignore_eos=True))
    except TensorParallelError as err:
        message = str(err)
    seconds = time.perf_counter() - start - 2.0
    llm.shutdown()
    return {"error": message, "seconds_after_kill": seconds, "left": [p.pid for p in procs if p.poll() is None]}


CASES = {"write": case_write_checkpoint, "correctness": case_correctness, "decode": case_decode,
         "throughput": case_throughput, "allreduce": case_allreduce, "fault": case_fault}


# ---- driver ------------------------------------------------------------------------------------
def run_case(name: str, **kw) -> dict:
    print(f"# {name} {kw}", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, __file__, "--case", name, json.dumps(kw)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    sys.stderr.write(proc.stderr[-3000:])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"failed": True, "returncode": proc.returncode, "stderr": proc.stderr[-2000:]}
    return json.loads(lines[-1])


def _environment() -> dict:
    import torch

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "num_gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "commit": os.environ.get("LLMCTL_COMMIT") or commit.stdout.strip() or "unknown"}


def decode_table(report: dict, tps: list[int]) -> list[str]:
    lines = ["| model | batch | " + " | ".join(f"TP={tp} step | tok/s" for tp in tps) + " |",
             "|---|---|" + "---|---|" * len(tps)]
    for quant in ("fp16", "gptq"):
        runs = [report["decode"].get(f"{quant}-tp{tp}", {}) for tp in tps]
        for b in ("1", "8", "32"):
            cells = [f"{r['step_ms'][b]:.2f} ms | {r['tok_s'][b]:.0f}" if "step_ms" in r else "failed | -" for r in runs]
            lines.append(f"| {quant} | {b} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case")
    parser.add_argument("args", nargs="?")
    parser.add_argument("--only", choices=["decode", "correctness", "throughput", "capacity", "fault", "all"], default="all")
    parser.add_argument("--tp", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--output", type=Path)
    opts = parser.parse_args()
    if opts.case:
        print(json.dumps(CASES[opts.case](**json.loads(opts.args)), default=str))
        return
    report: dict = {"environment": _environment(), "decode": {}, "correctness": {}}
    only = opts.only
    if only in ("all", "correctness"):
        with tempfile.TemporaryDirectory() as tmp:
            for quant in (False, True):
                model = run_case("write", out=f"{tmp}/{'gptq' if quant else 'fp16'}", quant=quant).get("dir")
                for eager in (False, True):
                    runs = {tp: run_case("correctness", model_dir=model, tp=tp, eager=eager) for tp in opts.tp}
                    key = f"{'gptq' if quant else 'fp16'}-{'eager' if eager else 'graphs'}"
                    ref = runs[1].get("tokens")
                    report["correctness"][key] = {f"tp{tp}": {"equal_to_tp1": r.get("tokens") == ref,
                                                              "decode_replays": r.get("decode_replays"),
                                                              "failed": r.get("failed", False)} for tp, r in runs.items()}
    if only in ("all", "decode"):
        for quant in (False, True):
            for tp in opts.tp:
                report["decode"][f"{'gptq' if quant else 'fp16'}-tp{tp}"] = run_case(
                    "decode", model=RECIPE_8B, tp=tp, quant=quant, batches=[1, 8, 32])
        if 2 in opts.tp:
            report["allreduce"] = run_case("allreduce", batches=[1, 8, 32])
    if only in ("all", "throughput"):
        report["throughput"] = {f"tp{tp}": run_case("throughput", tp=tp) for tp in opts.tp}
    if only in ("all", "capacity"):
        report["capacity"] = run_case("decode", model=RECIPE_70B, tp=2, quant=False, batches=[1, 32])
    if only in ("all", "fault"):
        report["fault"] = run_case("fault")
    print("\n".join(decode_table(report, opts.tp)) if report["decode"] else "")
    print(json.dumps({k: v for k, v in report.items() if k != "decode"}, indent=1, default=str)[:6000])
    if opts.output:
        opts.output.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
