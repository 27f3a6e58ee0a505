"""Scored tokens per second of `llmctl eval` on a Llama-3-8B-shaped model with random weights:
an fp16 baseline against a GPTQ 4-bit candidate (W4A16 kernels), through the functions eval
calls (EngineBackend.baseline_rows / window_scores over LLM's engine, perplexity_stats,
kld_stats), against transformers' batched forward computing the same on the same windows
(log_softmax of both models over the whole vocabulary, per-token KLD and NLL), same card,
same run.

transformers cannot run our GPTQ format without extra packages, so its candidate is a second
fp16 model of the same shapes: it does the same log-softmax and KLD work per token, and its
4-bit matmuls would not be faster than fp16 ones at prefill sizes.

Correctness: llmctl's fp16 baseline is loaded with the weights of transformers' fp16 model
(the same tensors, copied in memory) and their full-vocabulary log-prob rows are compared on a
few windows.

    python benchmarks/eval_gpu.py                  # H100/H200, ~2-3 minutes
    python benchmarks/eval_gpu.py --tiny --device cpu  # a shrunk shape: checks the script in ~20 s
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "llama3-8b.yaml"
# Measurements as they happen: what the output file gets if a later stage fails.
NOTES: list[str] = []
TINY_ARCH = {"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a shrunk Llama shape (checks the script on a CPU)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--num-windows", type=int, default=None, help="default 32 (tiny: 4)")
    p.add_argument("--window-len", type=int, default=None, help="default 2048 (tiny: 128)")
    p.add_argument("--top-k", type=int, default=256, help="eval's --kld-top-k")
    p.add_argument("--exact-windows", type=int, default=None,
                   help="windows for the exact (K = vocab) run; 0 skips it. default 4 (tiny: 2)")
    p.add_argument("--check-windows", type=int, default=2, help="windows of the llmctl vs transformers check")
    p.add_argument("--hf-batch", type=int, default=None, help="windows per transformers forward; default 4 (tiny: 2)")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--kv-cache-memory", default=None, help="default 8GiB (tiny: 64MiB)")
    p.add_argument("--commit", default=os.environ.get("LLMCTL_COMMIT", "unknown"))
    p.add_argument("--out", default=None, help="default $OUT/eval_gpu.txt (or ./eval_gpu.txt)")
    args = p.parse_args()
    args.num_windows = args.num_windows or (4 if args.tiny else 32)
    args.window_len = args.window_len or (128 if args.tiny else 2048)
    args.exact_windows = (2 if args.tiny else 4) if args.exact_windows is None else args.exact_windows
    args.hf_batch = args.hf_batch or (2 if args.tiny else 4)
    args.kv_cache_memory = args.kv_cache_memory or ("64MiB" if args.tiny else "8GiB")
    args.out = Path(args.out or Path(os.environ.get("OUT", ".")) / "eval_gpu.txt")
    return args


def recipe_path(tiny: bool, workdir: Path) -> Path:
    """The llama3-8b recipe, or a copy with a shrunk `model.arch`."""
    if not tiny:
        return RECIPE
    import yaml

    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["model"]["arch"].update(TINY_ARCH)
    recipe["model"]["arch"]["bos_token_id"], recipe["model"]["arch"]["eos_token_id"] = 1, [2]
    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: torch.device, fn):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def first_windows(windows, n: int):
    from llmctl.eval.windows import Windows

    return Windows(ids=windows.ids[:n], score_from=windows.score_from[:n], source=windows.source)


def base_slice(rows: dict, windows, n: int) -> dict:
    from llmctl.eval.backends import window_offsets

    stop = window_offsets(windows)[n]
    return {k: v[:stop] for k, v in rows.items()}


def make_llm(recipe: Path, args, dtype: str, quantization: str | None, seed: int):
    from llmctl.llm import LLM

    return LLM(str(recipe), load_format="dummy", device=args.device, dtype=dtype, quantization=quantization,
               seed=seed, max_model_len=args.window_len + 1, kv_cache_memory=args.kv_cache_memory,
               max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False,
               # scoring steps never replay a CUDA graph (prompt rows need every position's logits),
               # so capturing them would only cost start-up time
               enforce_eager=True)


# ---- transformers: the same windows, both models, whole-vocabulary KLD ---------------------------
@torch.inference_mode()
def hf_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    # ids: [B, L] -> [B, L, V] fp32 log-probs of the next token at every position
    return torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)


@torch.inference_mode()
def hf_pass(base, cand, windows, batch: int, device: torch.device) -> dict:
    """NLL of the baseline (and with `cand`, its NLL and exact KLD) on every scored token."""
    nll_base, nll_cand, kld = [], [], []
    for a in range(0, windows.ids.shape[0], batch):
        ids = windows.ids[a:a + batch].to(device)
        lp = hf_logprobs(base, ids)[:, :-1]  # [B, L - 1, V], row t predicts token t + 1
        lq = hf_logprobs(cand, ids)[:, :-1] if cand is not None else None
        targets = ids[:, 1:, None]
        for row, first in enumerate(windows.score_from[a:a + batch]):
            p = lp[row, first - 1:]
            nll_base.append(-p.gather(-1, targets[row, first - 1:])[:, 0])
            if lq is not None:
                q = lq[row, first - 1:]
                nll_cand.append(-q.gather(-1, targets[row, first - 1:])[:, 0])
                kld.append((p.exp() * (p - q)).sum(-1))
        del lp, lq
    out = {"nll_base": torch.cat(nll_base).cpu()}
    if cand is not None:
        out.update(nll_cand=torch.cat(nll_cand).cpu(), kld=torch.cat(kld).cpu())
    return out


def load_hf(arch: dict, dtype: torch.dtype, device: torch.device, seed: int):
    from llmctl.bench.hf_baseline import load_hf_model

    return load_hf_model(None, dtype, str(device), arch, seed=seed)


# ---- llmctl: eval's own functions over the engine --------------------------------------------------
def check_same_weights(llm, hf_model, windows, n: int, device: torch.device) -> dict:
    """Full-vocabulary log-prob rows of llmctl (engine, paged, chunked) vs transformers on the
    same weights: max and mean |difference|, and argmax agreement."""
    max_diff, sum_diff, count, same_argmax = 0.0, 0.0, 0, 0
    for i in range(n):
        ids = windows.ids[i:i + 1]
        ref = hf_logprobs(hf_model, ids.to(device))[0, :-1]  # [L - 1, V]
        first = windows.score_from[i]

        def compare(logprobs, targets, start, ref=ref):
            # logprobs: [R, V] the engine's rows for targets start..start+R-1
            diff = (logprobs - ref[start - 1:start - 1 + logprobs.shape[0]]).abs()
            same = logprobs.argmax(-1) == ref[start - 1:start - 1 + logprobs.shape[0]].argmax(-1)
            return {"max": diff.max(-1).values, "sum": diff.sum(-1), "same": same}

        out = llm.score([ids[0].tolist()], first, scorer=compare)[0]
        max_diff = max(max_diff, float(out["max"].max()))
        sum_diff += float(out["sum"].double().sum())
        count += out["sum"].numel() * ref.shape[-1]
        same_argmax += int(out["same"].sum())
    scored = sum(windows.ids.shape[1] - s for s in windows.score_from[:n])
    return {"windows": n, "tokens": scored, "max_abs_diff": max_diff, "mean_abs_diff": sum_diff / count,
            "same_argmax": same_argmax / scored}


def run(args) -> tuple[list[str], bool]:
    from llmctl.eval.backends import EngineBackend
    from llmctl.eval.stats import kld_stats, perplexity_stats
    from llmctl.eval.windows import sliding_windows
    from llmctl.models.loader import fill_parameters

    device = torch.device(args.device)
    dtype_name = "float16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, dtype_name)
    lines = []
    t_start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t_start:6.1f} s] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    def note(what: str, seconds: float, n: int) -> None:
        NOTES.append(f"{what}: {n} tokens in {seconds:.2f} s, {n / seconds:,.0f} scored tok/s")
        log(NOTES[-1])
    with tempfile.TemporaryDirectory() as tmp:
        recipe = recipe_path(args.tiny, Path(tmp))

        # llmctl's fp16 baseline gets the very tensors of transformers' fp16 model
        log("llmctl fp16 engine, then transformers fp16 model (random weights, copied into the engine)")
        base_llm = make_llm(recipe, args, dtype_name, None, seed=1)
        arch = base_llm.hf_model_spec()["arch_config"]
        vocab = arch["vocab_size"]
        gen = torch.Generator().manual_seed(0)
        stream = torch.randint(0, vocab, (args.num_windows * args.window_len,), generator=gen)
        windows = sliding_windows(stream, args.window_len, None, args.num_windows, "random token ids")
        num_tokens = windows.num_scored
        hf_base = load_hf(arch, dtype, device, seed=1)
        with torch.inference_mode():  # the engine's parameters are inference tensors
            fill_parameters(base_llm.engine.model, ((n, t, "transformers") for n, t in hf_base.state_dict().items()),
                            "transformers state dict")
        base_backend = EngineBackend(base_llm)

        log("llmctl: baseline pass (warm-up, then timed)")
        base_backend.baseline_rows(first_windows(windows, 2), args.top_k)
        rows, t_base = timed(device, lambda: base_backend.baseline_rows(windows, args.top_k))
        note("llmctl baseline pass", t_base, num_tokens)
        ppl_base = perplexity_stats(rows["logprob"])
        check = check_same_weights(base_llm, hf_base, windows, args.check_windows, device)
        NOTES.append(f"llmctl vs transformers, same weights: {check}")
        exact_w = first_windows(windows, args.exact_windows) if args.exact_windows else None
        if exact_w is not None:
            try:
                exact_rows, t_base_exact = timed(device, lambda: base_backend.baseline_rows(exact_w, 0))
                note("llmctl baseline pass, exact", t_base_exact, exact_w.num_scored)
            except Exception as err:  # e.g. out of memory: the main comparison goes on without it
                NOTES.append(f"exact baseline pass failed: {type(err).__name__}: {err}")
                exact_w = None
        base_llm.shutdown()
        base_backend = base_llm = None  # frees the engine

        log("llmctl: GPTQ 4-bit candidate (warm-up, then timed with KLD)")
        cand_llm = make_llm(recipe, args, dtype_name, "gptq", seed=2)
        cand_backend = EngineBackend(cand_llm)
        cand_backend.window_scores(first_windows(windows, 2), base_slice(rows, windows, 2))
        scores, t_cand = timed(device, lambda: cand_backend.window_scores(windows, rows))
        note("llmctl candidate pass", t_cand, num_tokens)
        stats = kld_stats(scores["kld"], rows["logprob"], scores["logprob"], scores["same_top1"])
        if exact_w is not None:
            try:
                exact_scores, t_cand_exact = timed(device, lambda: cand_backend.window_scores(exact_w, exact_rows))
                note("llmctl candidate pass, exact", t_cand_exact, exact_w.num_scored)
                topk_scores = cand_backend.window_scores(exact_w, base_slice(rows, windows, args.exact_windows))
            except Exception as err:
                NOTES.append(f"exact candidate pass failed: {type(err).__name__}: {err}")
                exact_w = None
            del exact_rows
        cand_llm.shutdown()
        cand_backend = cand_llm = None
        if device.type == "cuda":
            torch.cuda.empty_cache()

        log("transformers: stand-in candidate (a second fp16 model), timed passes")
        hf_cand = load_hf(arch, dtype, device, seed=2)
        hf_pass(hf_base, hf_cand, first_windows(windows, args.hf_batch), args.hf_batch, device)  # warm-up
        _, t_hf_base = timed(device, lambda: hf_pass(hf_base, None, windows, args.hf_batch, device))
        note("transformers baseline pass", t_hf_base, num_tokens)
        hf, t_hf_both = timed(device, lambda: hf_pass(hf_base, hf_cand, windows, args.hf_batch, device))
        note("transformers both models + KLD", t_hf_both, num_tokens)
        nll_diff = float((rows["logprob"] + hf["nll_base"]).abs().max())

    rate = lambda seconds, n=num_tokens: n / seconds  # noqa: E731
    head = (f"llmctl eval throughput, {'tiny shape' if args.tiny else 'Llama-3-8B shape'} (random weights), "
            f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, commit {args.commit}, "
            f"torch {torch.__version__}")
    lines += [head, f"windows: {args.num_windows} x {args.window_len} tokens, {num_tokens} scored tokens, "
              f"vocabulary {vocab}, llmctl max_num_batched_tokens {args.max_num_batched_tokens}, "
              f"transformers batch {args.hf_batch} windows", ""]
    dt = "fp16" if dtype == torch.float16 else "fp32"
    table = [(f"llmctl baseline pass ({dt}: NLL + top-{args.top_k} rows)", t_base, num_tokens),
             ("llmctl candidate pass (GPTQ W4A16: NLL + KLD vs top-%d)" % args.top_k, t_cand, num_tokens),
             ("llmctl eval, both passes", t_base + t_cand, num_tokens)]
    if exact_w is not None:
        n_exact = exact_w.num_scored
        table += [(f"llmctl baseline pass, exact (whole rows, --kld-top-k 0), {args.exact_windows} windows", t_base_exact, n_exact),
                  (f"llmctl candidate pass, exact KLD, {args.exact_windows} windows", t_cand_exact, n_exact),
                  ("llmctl eval exact, both passes", t_base_exact + t_cand_exact, n_exact)]
    table += [(f"transformers baseline pass ({dt}: NLL)", t_hf_base, num_tokens),
              (f"transformers both models + exact KLD ({dt} + {dt} stand-in)", t_hf_both, num_tokens)]
    width = max(len(name) for name, _, _ in table)
    lines.append(f"{'pass':<{width}}  {'tokens':>7}  {'seconds':>8}  {'scored tok/s':>12}")
    for name, seconds, n in table:
        lines.append(f"{name:<{width}}  {n:>7}  {seconds:>8.2f}  {rate(seconds, n):>12,.0f}")
    speedup = t_hf_both / (t_base + t_cand)
    lines += ["", f"llmctl eval (both passes) vs transformers (both models): {speedup:.2f}x; "
              f"goal >= 10,000 scored tok/s: {'met' if rate(t_base + t_cand) >= 10_000 else 'NOT met'}"]
    ok = check["max_abs_diff"] < (0.05 if dtype == torch.float16 else 1e-4)
    lines += ["", f"same weights, llmctl {dt} engine vs transformers {dt} forward, {check['windows']} windows "
              f"({check['tokens']} tokens x {vocab} log-probs): max |diff| {check['max_abs_diff']:.3g}, "
              f"mean |diff| {check['mean_abs_diff']:.3g}, same argmax {check['same_argmax']:.4f}: "
              f"{'PASS' if ok else 'FAIL'}",
              f"baseline NLL per token, llmctl (all windows) vs transformers: max |diff| {nll_diff:.3g}",
              f"baseline ppl {ppl_base['ppl']:.4g}; candidate mean KLD {stats['kld_mean']:.4g} "
              f"(transformers stand-in pair: {float(hf['kld'].double().mean()):.4g}), same top-1 {stats['same_top1']:.4f}"]
    if exact_w is not None:
        gap = (exact_scores["kld"] - topk_scores["kld"]).double()
        lines.append(f"top-{args.top_k} vs exact KLD on {args.exact_windows} windows: mean {float(topk_scores['kld'].mean()):.5g} "
                     f"vs {float(exact_scores['kld'].mean()):.5g} (exact - top-K: mean {float(gap.mean()):.3g}, "
                     f"min {float(gap.min()):.3g}, max {float(gap.max()):.3g}); random weights give near-uniform "
                     "rows whose tail outside the top-K holds most of the mass, so this gap says nothing about a "
                     "trained model's (docs/benchmarks.md has that one)")
    lines.append(f"wall time of the script: {time.perf_counter() - t_start:.0f} s")
    return lines, ok


def main() -> int:
    import signal

    args = parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))  # a `timeout` still leaves what was measured
    try:
        lines, ok = run(args)
    except BaseException:
        import traceback

        text = "\n".join([f"eval_gpu.py failed (commit {args.commit}); measured before the failure:", *NOTES,
                          "", traceback.format_exc()])
        args.out.write_text(text)
        print(text, file=sys.stderr)
        return 1
    text = "\n".join(lines + ["", "as measured:", *NOTES]) + "\n"
    print(text)
    args.out.write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
