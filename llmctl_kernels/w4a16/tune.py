"""Measure every W4A16 path and configuration on a GPU and record the per-M winners.

The result is the dispatch table of llmctl_kernels/w4a16/tables.json: for each GPU name, rows of
{max_m, path, config} (one list for the benchmark's layer shapes, keyed "NxK", and a "default"
list that is best by geometric mean over them). Thresholds between paths come out of this
measurement, not out of guesses.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable

import torch

from llmctl_kernels.w4a16.config import TABLES_FILE, clear_caches, device_name
from llmctl_kernels.w4a16.dequant import w4a16_dequantize
from llmctl_kernels.w4a16.dispatch import w4a16_matmul
from llmctl_kernels.w4a16.frag_gemm import FRAG_GEMM_CONFIGS
from llmctl_kernels.w4a16.frag_gemv import FRAG_GEMV_CONFIGS
from llmctl_kernels.w4a16.gemm import GEMM_CONFIGS
from llmctl_kernels.w4a16.gemv import GEMV_CONFIGS
from llmctl_kernels.w4a16.layout import W4A16Weights, prepare_w4a16_weights
from llmctl_kernels.w4a16.scratch import SPLIT_K_MAX_M

GEMV_MAX_M = 4  # beyond this the GEMV rereads the weights once per row and cannot win
# A candidate must match the fp32 product of the same codes this closely to be picked (the kernels'
# accuracy goal; deeper split-K than the candidates', whose partials meet in fp16, misses it).
MAX_REL_ERR = 1e-3
DEQUANT_MIN_M = 64


def random_layer(n: int, k: int, group_size: int, act_order: bool, device: torch.device, seed: int = 0,
                 layout: str | None = None) -> W4A16Weights:
    """A GPTQ linear with random codes, zeros and scales, prepared for the kernels."""
    gen = torch.Generator(device=device).manual_seed(seed)
    gs = k if group_size == -1 else group_size
    num_groups = -(-k // gs)
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), generator=gen, device=device, dtype=torch.int32)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (num_groups, n // 8), generator=gen, device=device, dtype=torch.int32)
    scales = (torch.rand(num_groups, n, generator=gen, device=device) * 0.01 + 0.001).half()
    order = torch.randperm(k, generator=gen, device=device) if act_order else torch.arange(k, device=device)
    g_idx = torch.empty(k, dtype=torch.int32, device=device)
    g_idx[order] = (torch.arange(k, device=device) // gs).int()
    return prepare_w4a16_weights(qweight, qzeros, scales, g_idx, 4, 1, layout=layout)


def time_ms(fn: Callable[[], object], rep_ms: int = 20, warmup_ms: int = 5) -> float:
    """Median time of fn in ms with L2 flushed before every call (triton.testing.do_bench).

    Includes whatever host time the launch takes beyond the flush: use for big, eager work.
    """
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def num_rotations(bytes_per_set: int, device: torch.device) -> int:
    """Input sets to cycle through so that consecutive calls cannot hit in L2."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(2, min(16, -(-3 * l2 // max(bytes_per_set, 1))))


def time_graph_ms(fns: list[Callable[[], object]], min_calls: int = 16, reps: int = 10) -> float:
    """Device time per call in ms: all fns (one per rotated input set) replayed from one CUDA graph.

    A graph replay has no host launch gaps, as in a captured decode step; rotating input sets
    keeps weights out of L2 between calls, so each call streams its weights from memory.
    """
    for fn in fns:
        fn()  # compile and allocate outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    rounds = -(-min_calls // len(fns))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for fn in fns:
                fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (rounds * len(fns)))
    del graph
    return sorted(times)[len(times) // 2]


def layer_bytes(w: W4A16Weights) -> int:
    return sum(t.numel() * t.element_size() for t in (w.qweight, w.qzeros, w.scales, w.perm) if t is not None)


def candidates(m: int, layout: str = "frag") -> list[tuple[str, dict]]:
    """The (path, config) pairs worth timing at this M, for weights in `layout`."""
    out: list[tuple[str, dict]] = []
    if m <= GEMV_MAX_M:
        out += [("gemv", c) for c in (FRAG_GEMV_CONFIGS if layout == "frag" else GEMV_CONFIGS)]
    for c in FRAG_GEMM_CONFIGS if layout == "frag" else GEMM_CONFIGS:
        if c["BLOCK_M"] > max(16, 4 * m) or (c["SPLIT_K"] > 1 and m > SPLIT_K_MAX_M):
            continue
        out.append(("gemm", c))
    if m >= DEQUANT_MIN_M:
        out.append(("dequant", {}))
    return out


def sweep(shapes: list[tuple[int, int]], ms: list[int], group_size: int = 128,
          log: Callable[[str], None] = print, layout: str = "frag") -> list[dict]:
    """Time every candidate on every (N, K) and M; each result also carries its error against fp32."""
    device = torch.device("cuda")
    records = []
    for n, k in shapes:
        w = random_layer(n, k, group_size, False, device, layout=layout)
        rotated = [w] + [random_layer(n, k, group_size, False, device, seed=s, layout=layout)
                         for s in range(1, num_rotations(layer_bytes(w), device))]
        dense = w4a16_dequantize(w, torch.float32)
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            ref = x.float() @ dense
            best = math.inf
            for path, config in candidates(m, layout):
                rec = dict(n=n, k=k, m=m, path=path, config=config)
                try:
                    out = w4a16_matmul(x, w, path=path, config=config)
                    rec["rel_err"] = float((out.float() - ref).norm() / ref.norm())
                    fns = [functools.partial(w4a16_matmul, x, r, path=path, config=config) for r in rotated]
                    rec["ms"] = time_graph_ms(fns)
                    best = min(best, rec["ms"] if rec["rel_err"] <= MAX_REL_ERR else math.inf)
                except Exception as err:  # a config the compiler or the chip rejects is skipped
                    rec["error"] = f"{type(err).__name__}: {str(err)[:200]}"
                records.append(rec)
            mine = [r for r in records if (r["n"], r["k"], r["m"]) == (n, k, m)]
            worst = max((r["rel_err"] for r in mine if "rel_err" in r), default=float("nan"))
            failed = sum("error" in r for r in mine)
            log(f"tune N={n} K={k} M={m}: best {best * 1e3:.1f} us over {len(mine)} candidates "
                f"({failed} rejected by the compiler), worst rel err {worst:.1e}")
        del rotated, dense
        torch.cuda.empty_cache()
    return records


def _key(rec: dict) -> str:
    return json.dumps([rec["path"], rec["config"]], sort_keys=True)


def _rows(best_per_m: dict[int, tuple[str, dict]]) -> list[dict]:
    """Per-M winners as table rows; neighbours with the same choice merge into one row."""
    rows: list[dict] = []
    for m in sorted(best_per_m):
        path, config = best_per_m[m]
        if rows and rows[-1]["path"] == path and rows[-1]["config"] == config:
            rows[-1]["max_m"] = m
        else:
            rows.append({"max_m": m, "path": path, "config": config})
    rows[-1]["max_m"] = None
    return rows


def build_table(records: list[dict]) -> dict[str, list[dict]]:
    """{"NxK": rows, ..., "default": rows}: fastest valid candidate per M, per shape and by geomean."""
    ok = [r for r in records if "ms" in r and r["rel_err"] <= MAX_REL_ERR]
    shapes = sorted({(r["n"], r["k"]) for r in ok})
    ms = sorted({r["m"] for r in ok})
    table: dict[str, list[dict]] = {}
    for n, k in shapes:
        best = {}
        for m in ms:
            mine = [r for r in ok if (r["n"], r["k"], r["m"]) == (n, k, m)]
            if mine:
                win = min(mine, key=lambda r: r["ms"])
                best[m] = (win["path"], win["config"])
        table[f"{n}x{k}"] = _rows(best)
    default = {}
    for m in ms:
        by_key: dict[str, list[float]] = {}
        for r in ok:
            if r["m"] == m:
                by_key.setdefault(_key(r), []).append(r["ms"])
        full = {key: v for key, v in by_key.items() if len(v) == len(shapes)}
        if full:
            win = min(full, key=lambda key: sum(math.log(t) for t in full[key]))
            default[m] = tuple(json.loads(win))
    table["default"] = _rows(default)
    return table


def splice_rows(new: list[dict], old: list[dict], up_to_m: int) -> list[dict]:
    """Rows that follow `new` for M <= up_to_m and `old` beyond (a re-tune of the small-M rows)."""
    rows = [dict(r) for r in new if r["max_m"] is None or r["max_m"] < up_to_m]
    rows[-1]["max_m"] = up_to_m
    for r in old:
        if r["max_m"] is None or r["max_m"] > up_to_m:
            if rows[-1]["path"] == r["path"] and rows[-1]["config"] == r["config"]:
                rows[-1]["max_m"] = r["max_m"]
            else:
                rows.append(dict(r))
    return rows


def write_table(table: dict[str, list[dict]], device: torch.device, layout: str = "frag", path=TABLES_FILE) -> None:
    """Merge this GPU's table for `layout` into the JSON file, keeping other GPUs' and layouts' entries."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("devices", {}).setdefault(device_name(device), {})[layout] = table
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    clear_caches()
