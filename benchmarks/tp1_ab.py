"""TP = 1 decode step of several source trees in one call, interleaved: is the single-device
path as fast as before the tensor-parallel change?

    python benchmarks/tp1_ab.py --tree old=.tpab/old --tree new=. --out "$OUT/tp1_ab.txt"   # GPU
    python benchmarks/tp1_ab.py --tiny --tree old=.tpab/old --tree new=.                   # CPU, host work

An old tree is `git archive COMMIT llmctl llmctl_kernels recipes` (plus kernels/, which the
llmctl_kernels link pointed at, in older trees) unpacked into an ignored folder, with the commit in a COMMIT file beside them.

Each tree gets one worker process per model (fp16 and GPTQ 4-bit g128, Llama-3-8B shapes with
random weights, `--load-format dummy`, CUDA graphs on, a fixed KV budget so the workers share one
GPU), started with PYTHONPATH at that tree, so each imports its own llmctl. The workers load once
and wait; the driver then asks them in turn for one measurement each, round after round, the
trees' order reversed every round (old, new, new, old, ...), so a drift of the GPU's clocks falls
on every tree alike. A measurement is the decode step as benchmarks/tp_two_gpu.py times it: `batch`
prompts of 128 tokens prefilled, then `--steps` engine steps (greedy), wall time per step. The table
gives each cell's median over the rounds and the ratio of each tree's median to the first tree's.

`--tiny` runs a 2-layer Llama of hidden size 64 in fp32 on the CPU (the model's compute is a small
fixed cost) at batch 1/8/32/128: the step's host work (schedule, batch building, input preparation,
output processing), in the worker's CPU time (one thread; other load on the machine stays out).
There each row also splits the step into the model (forward, logits and sampler, timed around
those calls) and the rest, the host.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT_LEN = 128
TINY_ARCH = {"architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 64,
             "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 1024,
             "rms_norm_eps": 1.0e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
             "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": [2]}


# ---- worker: one engine of one tree, measuring on request ----------------------------------------
class _Timed:
    """Wraps a callable and adds its CPU time to a shared counter (CPU only: no sync needed)."""

    def __init__(self, fn, total: list[float]) -> None:
        self.fn, self.total = fn, total

    def __call__(self, *args, **kwargs):
        start = time.process_time()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.total[0] += time.process_time() - start


def _sampling_params():
    """The class the tree's engine uses (it moved between trees)."""
    from llmctl.engine import llm_engine

    return llm_engine.SamplingParams


def _only_this_tree() -> None:
    """An editable install's finder would serve a module this tree lacks from the installed
    tree: each worker imports its own tree's modules or fails."""
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]


def _measure(engine, batch: int, steps: int, tag: str, vocab: int, model_time: list[float], clock=time.perf_counter
             ) -> dict:
    params = _sampling_params()(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(batch)]
    for i, rid in enumerate(ids):
        engine.add_request(rid, [(i * 131 + len(tag) * 7 + j) % (vocab - 10) + 10 for j in range(PROMPT_LEN)], params)
    while engine.get_stats().num_running < batch or any(
            s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running):
        engine.step()
    model_time[0] = 0.0
    start = clock()
    for _ in range(steps):
        engine.step()
    wall = clock() - start
    engine.abort_request(ids)
    engine.block_manager.reset_prefix_cache()
    return {"ms": wall / steps * 1e3, "model_ms": model_time[0] / steps * 1e3}


def worker(opts) -> None:
    _only_this_tree()
    import torch

    import llmctl
    from llmctl.llm import LLM

    if opts.tiny:
        torch.set_num_threads(1)
    kw = {"quantization": "gptq"} if opts.quant == ["gptq"] else {}  # a worker gets one: ["gptq"] or ["dense"]
    start = time.perf_counter()
    llm = LLM(opts.recipe, load_format="dummy", dtype=opts.dtype, device=opts.device, max_num_seqs=max(opts.batches),
              max_model_len=1024, kv_cache_memory=opts.kv_cache_memory, **kw)
    engine = llm.engine
    model_time = [0.0]
    if opts.tiny:  # the model's share of the step, to tell it from the host's
        runner = engine.runner
        runner.model.forward = _Timed(runner.model.forward, model_time)
        runner.model.compute_logits = _Timed(runner.model.compute_logits, model_time)
        runner.sampler = _Timed(runner.sampler, model_time)
    # On the CPU the process's own CPU time: the engine is one thread, and a busy machine's other
    # work stays out of the numbers.
    clock = time.process_time if opts.tiny else time.perf_counter
    for b in opts.batches:  # first-time work (allocations, kernels of a new size) off the record
        _measure(engine, b, 8, f"warm{b}", engine.arch.vocab_size, model_time, clock)
    graphs = getattr(engine.runner, "decode_graphs", None)
    kernels = sys.modules.get("llmctl_kernels") or sys.modules.get("kernels")  # renamed between trees
    print(json.dumps({"ready": True, "llmctl": llmctl.__file__, "kernels": getattr(kernels, "__file__", None),
                      "load_s": time.perf_counter() - start, "decode_graphs": graphs is not None,
                      "gptq": engine.arch.is_gptq}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        result = _measure(engine, cmd["batch"], cmd["steps"], cmd["tag"], engine.arch.vocab_size, model_time, clock)
        print(json.dumps(result), flush=True)
    if hasattr(llm, "shutdown"):
        llm.shutdown()


# ---- driver -----------------------------------------------------------------------------------------
class Worker:
    """One tree's engine for one model, in its own process; its stderr goes to a file."""

    def __init__(self, name: str, tree: Path, quant: str, opts, recipe: str, log: Path) -> None:
        self.name, self.quant, self.log = name, quant, log
        cmd = [sys.executable, __file__, "--worker", "--quant", quant, "--recipe", recipe, "--dtype", opts.dtype,
               "--device", opts.device, "--kv-cache-memory", opts.kv_cache_memory,
               "--batches", *map(str, opts.batches)] + (["--tiny"] if opts.tiny else [])
        # The tree first: its llmctl (and its kernels package) win; what else is on the path (wheels) stays.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p)}
        with open(log, "w") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                         env=env, cwd=str(tree))
        self.info: dict = {}
        self.error: str | None = None

    def read(self) -> dict | None:
        """The worker's next JSON line; None (and `error` set) if it died."""
        while self.error is None:
            line = self.proc.stdout.readline()
            if not line:
                tail = self.log.read_text()[-1500:]
                self.error = f"exited with {self.proc.wait()}: {tail}"
                print(f"# {self.name}/{self.quant} failed: {self.error}", file=sys.stderr, flush=True)
            elif line.startswith("{"):
                return json.loads(line)
        return None

    def ask(self, **cmd) -> dict | None:
        if self.error is not None:
            return None
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # read() reports the death
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def _recipe(tree: Path, opts, tmp: str) -> str:
    if not opts.tiny:
        return str(tree / "recipes/llama3-8b.yaml")
    path = Path(tmp) / "tiny.yaml"
    if not path.exists():
        import yaml

        path.write_text(yaml.safe_dump({"name": "tiny-llama", "model": {"arch": TINY_ARCH}}))
    return str(path)


def _commit(tree: Path) -> str:
    """A tree's COMMIT file (written beside an archived tree), else LLMCTL_COMMIT for the checkout."""
    file = tree / "COMMIT"
    return file.read_text().strip() if file.is_file() else os.environ.get("LLMCTL_COMMIT", "unknown")


def _table(results: dict, trees: list[str], quants: list[str], batches: list[int], tiny: bool) -> list[str]:
    first = trees[0]
    head = "| model | batch | " + " | ".join(f"{t} ms/step" for t in trees) + " | " + " | ".join(
        f"{t}/{first}" for t in trees[1:]) + " |"
    if tiny:
        head += " " + " | ".join(f"{t} host ms" for t in trees) + " |"
    cols = head.count("|") - 1
    lines = [head, "|" + "---|" * cols]
    for q in quants:
        for b in batches:
            runs = {t: results.get((t, q, b)) for t in trees}
            med = {t: statistics.median(r["ms"] for r in rs) if rs else None for t, rs in runs.items()}
            cells = [f"{med[t]:.3f}" if med[t] else "failed" for t in trees]
            cells += [f"{med[t] / med[first]:.3f}" if med[t] and med[first] else "-" for t in trees[1:]]
            if tiny:
                cells += [f"{statistics.median(r['ms'] - r['model_ms'] for r in runs[t]):.3f}" if runs[t] else "-"
                          for t in trees]
            lines.append(f"| {q} | {b} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", default=[], help="NAME=PATH of a source tree (first: the baseline)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=210,
                        help="start no round that would end past this many seconds from the start")
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="*")
    parser.add_argument("--quant", nargs="*", default=["fp16", "gptq"], help="fp16 and/or gptq")
    parser.add_argument("--tiny", action="store_true", help="a tiny fp32 Llama on the CPU (host work)")
    parser.add_argument("--kv-cache-memory", default=None)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    opts.batches = opts.batches or ([1, 8, 32, 128] if opts.tiny else [1, 8, 32])
    opts.dtype = opts.dtype or ("float32" if opts.tiny else "float16")
    opts.device = opts.device or ("cpu" if opts.tiny else "cuda")
    # A fixed budget each (the workers share one GPU): batch 32 x 264 tokens of Llama-3-8B take 1.1 GiB.
    opts.kv_cache_memory = opts.kv_cache_memory or ("64MiB" if opts.tiny else "2GiB")
    if opts.worker:
        worker(opts)
        return
    trees = dict(t.split("=", 1) for t in opts.tree) or {"new": "."}
    trees = {name: Path(path).resolve() for name, path in trees.items()}
    if opts.tiny:
        opts.quant = ["fp32"]
    elif not set(opts.quant) <= {"fp16", "gptq"}:
        parser.error(f"--quant: fp16 and/or gptq, got {opts.quant}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workers = {}
        try:
            for name, tree in trees.items():  # started together: they load and capture at once
                for q in opts.quant:
                    workers[name, q] = Worker(name, tree, "gptq" if q == "gptq" else "dense", opts,
                                              _recipe(tree, opts, tmp), Path(tmp) / f"{name}-{q}.log")
            for (name, q), w in workers.items():
                w.info = w.read() or {}
                print(f"# {name}/{q}: {w.info}", file=sys.stderr, flush=True)
            load_s = time.perf_counter() - start
            results = _rounds(workers, list(trees), opts, start)
        finally:
            for w in workers.values():
                w.close()
    text = _report(trees, workers, results, opts, load_s, time.perf_counter() - start)
    print(text)
    if opts.out:
        opts.out.write_text(text)


def _rounds(workers: dict, names: list[str], opts, start: float) -> dict:
    """(tree, model, batch) -> the measurements, one per round, trees in alternating order."""
    results: dict = {}
    for r in range(opts.rounds):
        round_start = time.perf_counter()
        order = names if r % 2 == 0 else names[::-1]
        for b in opts.batches:
            for q in opts.quant:
                for name in order:
                    res = workers[name, q].ask(batch=b, steps=opts.steps, tag=f"r{r}b{b}")
                    if res is not None:
                        results.setdefault((name, q, b), []).append(res)
        now = time.perf_counter()
        print(f"# round {r + 1}/{opts.rounds} done at {now - start:.0f} s", file=sys.stderr, flush=True)
        if r + 1 < opts.rounds and now - start + (now - round_start) > opts.max_seconds:
            print(f"# stopping after {r + 1} rounds (--max-seconds {opts.max_seconds:.0f})", file=sys.stderr)
            break
    return results


def _report(trees: dict, workers: dict, results: dict, opts, load_s: float, total_s: float) -> str:
    import torch

    device = torch.cuda.get_device_name(0) if opts.device == "cuda" and torch.cuda.is_available() else "cpu"
    num_rounds = max((len(v) for v in results.values()), default=0)
    what = "tiny fp32 Llama (host work)" if opts.tiny else "Llama-3-8B shapes, dummy weights, CUDA graphs"
    lines = [f"TP=1 decode step, interleaved A/B: {num_rounds} rounds x {opts.steps} steps, prompts of "
             f"{PROMPT_LEN} tokens, greedy; {what}",
             f"device: {device}, torch {torch.__version__}; load {load_s:.0f} s, total {total_s:.0f} s; "
             "cells: median over rounds"]
    for (name, q), w in workers.items():
        lines.append(f"{name} = {trees[name]} at {_commit(trees[name])}, {q}: llmctl from {w.info.get('llmctl')}, "
                     f"kernels from {w.info.get('kernels')}, decode graphs {w.info.get('decode_graphs')}, GPTQ weights {w.info.get('gptq')}, "
                     f"loaded in {w.info.get('load_s', 0):.0f} s" + (f"; FAILED {w.error}" if w.error else ""))
    lines += [""] + _table(results, list(trees), opts.quant, opts.batches, opts.tiny)
    lines += ["", "per-round ms (for the spread):"] + [
        f"{n} {q} b{b}: " + " ".join(f"{r['ms']:.3f}" for r in results.get((n, q, b), []))
        for q in opts.quant for b in opts.batches for n in trees]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
