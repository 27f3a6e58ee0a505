"""Offline throughput (`llmctl bench throughput`, after `vllm bench throughput`): one
workload of token-id prompts run through llmctl's engine and, in the same process, the
transformers baselines; requests/s, output tok/s and total tok/s for each."""

from __future__ import annotations

import os
import platform
import random
import subprocess
import time
from dataclasses import asdict, replace
from typing import Callable

from llmctl.bench.result import BenchResult
from llmctl.config import BenchConfig, EngineConfig

BACKENDS = ("llmctl", "hf", "hf-sequential")

# (backend, event, payload): "start" {"total": n}, "advance" {"n": k}, "done" {"result": BenchResult},
# "log" {"message": str}, "kv_plan" {"plan": KVPlan, "message": str}. The CLI draws; nothing here does.
BenchCallback = Callable[[str, str, dict], None]


def sample_prompts(bench: BenchConfig, vocab_size: int, tokenizer=None) -> list[list[int]]:
    """`num_prompts` prompts of exactly `input_len` token ids: uniform random ids (special
    tokens excluded when the tokenizer names them) or consecutive windows of the corpus."""
    if bench.dataset == "corpus":
        return _corpus_prompts(bench, tokenizer)
    rng = random.Random(bench.seed)
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    allowed = [t for t in range(vocab_size) if t not in special] if special else None
    if allowed is None:
        return [[rng.randrange(vocab_size) for _ in range(bench.input_len)] for _ in range(bench.num_prompts)]
    return [rng.choices(allowed, k=bench.input_len) for _ in range(bench.num_prompts)]


def _corpus_prompts(bench: BenchConfig, tokenizer) -> list[list[int]]:
    from llmctl.errors import ConfigError
    from llmctl.eval.corpus import load_corpus_split

    if tokenizer is None:
        raise ConfigError("--dataset corpus: needs the model's tokenizer (this model has none)",
                          hint="use --dataset random")
    articles = list(load_corpus_split().train)
    random.Random(bench.seed).shuffle(articles)
    need = bench.num_prompts * bench.input_len
    stream: list[int] = []
    for text in articles:
        stream += tokenizer.encode(text + "\n\n", add_special_tokens=False)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ConfigError(f"--dataset corpus: the corpus has {len(stream):,} tokens, fewer than "
                          f"{bench.num_prompts} x {bench.input_len}")
    return [stream[i * bench.input_len:(i + 1) * bench.input_len] for i in range(bench.num_prompts)]


def run_llmctl(llm, prompts: list[list[int]], bench: BenchConfig, on_event: BenchCallback,
               name: str = "llmctl") -> BenchResult:
    """The whole workload submitted at once, as `vllm bench throughput` does."""
    from llmctl.sampling_params import SamplingParams

    params = SamplingParams(n=bench.n, temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=bench.output_len)
    # Untimed warm-up on the workload's first batch, two tokens each: Triton compiles a kernel at
    # its first launch with new constants (a prefill size's GEMM configuration, prefill attention),
    # 1-3 s each on a GPU, which would otherwise count against the first requests. Then the
    # prefix cache forgets those prompts, and the counters below are differences.
    engine = llm.engine
    warm = prompts[:max(1, min(len(prompts), engine.config.scheduler.max_num_seqs))]
    llm.generate(warm, replace(params, max_tokens=min(2, bench.output_len)))
    engine.block_manager.reset_prefix_cache()
    before = engine.get_stats()
    on_event(name, "start", {"total": len(prompts)})
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, on_finished=lambda k: on_event(name, "advance", {"n": k}))
    elapsed = time.perf_counter() - start
    stats = engine.get_stats()
    return BenchResult(
        backend="llmctl", num_requests=len(prompts), elapsed_s=elapsed,
        num_prompt_tokens=sum(len(o.prompt_token_ids) for o in outputs),
        num_output_tokens=sum(len(c.token_ids) for o in outputs for c in o.outputs),
        extra={"num_preemptions": stats.num_preemptions - before.num_preemptions, "kv_waste_mean": stats.kv_waste_mean,
               "num_kv_blocks": stats.num_total_blocks, "max_num_running": stats.max_num_running,
               "num_steps": stats.num_steps - before.num_steps},
    )


def run_hf_backend(backend: str, model_spec: dict, prompts: list[list[int]], bench: BenchConfig,
                   batch_size: int, on_event: BenchCallback) -> BenchResult:
    import torch

    from llmctl.bench.hf_baseline import load_hf_model, run_hf

    dtype = getattr(torch, model_spec["dtype"])
    model = load_hf_model(model_spec["model_dir"], dtype, model_spec["device"], model_spec.get("arch_config"))
    size = 1 if backend == "hf-sequential" else batch_size
    on_event(backend, "start", {"total": len(prompts)})
    result = run_hf(model, prompts, bench.output_len, bench.n, size, backend,
                    on_progress=lambda k: on_event(backend, "advance", {"n": k}))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def environment() -> dict:
    """Machine and commit, recorded with every result."""
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "processor": _cpu_name(), "num_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info["commit"] = os.environ.get("LLMCTL_COMMIT")  # a copy of the tree without .git names its commit here
    if not info["commit"]:
        try:
            info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                            text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            info["commit"] = None
    return info


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_throughput(engine_config: EngineConfig, bench: BenchConfig, backends: tuple[str, ...],
                   hf_batch_size: int, load_format: str = "auto",
                   on_event: BenchCallback = lambda *_: None, baseline: str | None = None) -> dict:
    """Every backend on the same prompts; returns {"environment", "config", "results"}.
    `baseline`: a second model run through llmctl's engine with the same settings and prompts
    after the first (row "baseline"), e.g. a checkpoint's original beside the checkpoint."""
    from llmctl.llm import LLM

    env = environment()  # before the run: the commit that was measured, not one that landed meanwhile

    def progress(event: str, info: dict) -> None:
        on_event("llmctl", event if event == "kv_plan" else "log", info)

    llm = LLM.from_engine_config(engine_config, load_format=load_format, progress=progress)
    prompts = sample_prompts(bench, llm.vocab_size, llm.tokenizer)
    model_spec = llm.hf_model_spec()
    results = []
    if "llmctl" in backends:
        results.append(run_llmctl(llm, prompts, bench, on_event))
        on_event("llmctl", "done", {"result": results[-1]})
    llm.shutdown()
    del llm
    if baseline is not None:
        results.append(_run_baseline(engine_config, baseline, load_format, prompts, bench, on_event))
    for backend in ("hf", "hf-sequential"):
        if backend in backends:
            results.append(run_hf_backend(backend, model_spec, prompts, bench, hf_batch_size, on_event))
            on_event(backend, "done", {"result": results[-1]})
    return {"environment": env, "config": asdict(bench), "model": model_spec["name"],
            "quantization": model_spec["quantization"], "load_format": load_format, "baseline": baseline,
            "cuda_graphs": not engine_config.model.enforce_eager and model_spec["device"].startswith("cuda"),
            "results": [r.to_dict() for r in results]}


def _run_baseline(engine_config: EngineConfig, model: str, load_format: str, prompts: list[list[int]],
                  bench: BenchConfig, on_event: BenchCallback) -> BenchResult:
    from llmctl.llm import LLM

    config = replace(engine_config, model=replace(engine_config.model, model=model, quantization=None))
    llm = LLM.from_engine_config(config, load_format=load_format,
                                 progress=lambda event, info: on_event("baseline", "log", info))
    result = replace(run_llmctl(llm, prompts, bench, on_event, name="baseline"), backend="baseline")
    on_event("baseline", "done", {"result": result})
    llm.shutdown()
    return result


def summary_rows(report: dict) -> list[dict]:
    """One row per backend, with its speed-up over each baseline present in the same run."""
    results = report["results"]
    by_backend = {r["backend"]: r for r in results}
    rows = []
    for r in results:
        row = {"backend": r["backend"], "requests": r["num_requests"], "elapsed_s": r["elapsed_s"],
               "requests_per_s": r["requests_per_second"], "output_tok_s": r["output_throughput"],
               "total_tok_s": r["total_token_throughput"]}
        for base in ("baseline", "hf", "hf-sequential"):
            if base in by_backend and base != r["backend"]:
                row[f"x_{base}"] = r["output_throughput"] / by_backend[base]["output_throughput"]
        rows.append(row)
    return rows
