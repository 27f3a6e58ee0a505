"""`llmctl bench kernels`: W4A16 kernels against cuBLAS fp16 on Llama-3-8B layer shapes.

For every shape and M: the fp16 baseline (`F.linear` on the dequantized weight), our dispatched
kernel with act-order off and on, the speedup, and the effective bandwidth (bytes that must move
divided by time) as a share of the measured device-to-device copy bandwidth. Both sides are timed
as CUDA-graph replays (no host launch gaps, as a captured decode step runs) over enough weight
copies that no call finds its weights in L2; eager timings with host overhead come beside them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from llmctl.errors import ConfigError, LlmctlError

# (name, in_features K, out_features N)
LLAMA3_8B_SHAPES = (("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096))
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)


class DeviceUnavailableError(LlmctlError):
    """The kernel benchmark needs a CUDA GPU."""


@dataclass(frozen=True)
class KernelBenchConfig:
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    shapes: tuple[tuple[str, int, int], ...] = LLAMA3_8B_SHAPES
    group_size: int = 128
    act_order: bool = True  # also time the act-order (permuted K) weights
    reps: int = 20  # graph replays per timing (median)
    eager: bool = True  # also time eager launches (host overhead included)

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError(f"batch_sizes must be positive integers, got {self.batch_sizes}")
        if self.group_size not in (-1, 32, 64, 128):
            raise ConfigError(f"group_size must be -1, 32, 64 or 128, got {self.group_size}")
        if self.reps < 1:
            raise ConfigError(f"reps must be positive, got {self.reps}")


def measure_copy_bandwidth(device, num_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    import torch

    from llmctl_kernels.w4a16.tune import time_ms

    src = torch.empty(num_bytes // 2, dtype=torch.float16, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), rep_ms=200)
    return 2 * num_bytes / (ms * 1e-3) / 1e9


def _w4a16_bytes(m: int, k: int, n: int, group_size: int, act_order: bool) -> int:
    num_groups = 1 if group_size == -1 else -(-k // group_size)
    weight = k * n // 2 + num_groups * n * 2 + num_groups * n // 2 + (4 * k if act_order else 0)
    return weight + 2 * m * k + 2 * m * n


def _bench_shape(
    name: str, k: int, n: int, cfg: KernelBenchConfig, copy_gbps: float, log: Callable[[str], None]
) -> list[dict]:
    import functools

    import torch
    import torch.nn.functional as F

    from llmctl_kernels.w4a16 import select_path, w4a16_dequantize, w4a16_matmul
    from llmctl_kernels.w4a16.tune import layer_bytes, num_rotations, random_layer, time_graph_ms, time_ms

    device = torch.device("cuda")
    gs = cfg.group_size

    def layers(act_order: bool, first_seed: int) -> list:
        first = random_layer(n, k, gs, act_order, device, seed=first_seed)
        count = num_rotations(layer_bytes(first), device)
        return [first] + [random_layer(n, k, gs, act_order, device, seed=first_seed + i) for i in range(1, count)]

    plain = layers(False, 100)
    permuted = layers(True, 200) if cfg.act_order else None
    dense = [w4a16_dequantize(w, torch.float16).t().contiguous() for w in plain[: num_rotations(2 * k * n, device)]]
    rows = []
    for m in cfg.batch_sizes:
        x = torch.randn(m, k, device=device, dtype=torch.float16)
        out = w4a16_matmul(x, plain[0])
        ref = F.linear(x.float(), dense[0].float())
        rel_err = float((out.float() - ref).norm() / ref.norm())
        fp16_ms = time_graph_ms([functools.partial(F.linear, x, d) for d in dense], reps=cfg.reps)
        ours_ms = time_graph_ms([functools.partial(w4a16_matmul, x, w) for w in plain], reps=cfg.reps)
        path, config = select_path(m, n, k, device, plain[0].layout)
        row = dict(shape=name, k=k, n=n, m=m, layout=plain[0].layout, path=path, config=dataclasses.asdict(config), rel_err=rel_err,
                   fp16_us=fp16_ms * 1e3, w4a16_us=ours_ms * 1e3, speedup=fp16_ms / ours_ms)
        row["gbps"] = _w4a16_bytes(m, k, n, gs, False) / (ours_ms * 1e-3) / 1e9
        row["bw_share"] = row["gbps"] / copy_gbps
        row["fp16_gbps"] = (2 * k * n + 2 * m * k + 2 * m * n) / (fp16_ms * 1e-3) / 1e9
        if permuted is not None:
            act_ms = time_graph_ms([functools.partial(w4a16_matmul, x, w) for w in permuted], reps=cfg.reps)
            row["act_order_us"] = act_ms * 1e3
        if cfg.eager:
            # Launched one by one from Python, L2 flushed before each call: host overhead included.
            row["eager_fp16_us"] = time_ms(lambda: F.linear(x, dense[0]), 20) * 1e3
            row["eager_w4a16_us"] = time_ms(lambda: w4a16_matmul(x, plain[0]), 20) * 1e3
        rows.append(row)
        log(f"{name:8s} M={m:5d} fp16 {row['fp16_us']:9.1f} us  w4a16 {row['w4a16_us']:9.1f} us  "
            f"x{row['speedup']:.2f}  {path}  err {rel_err:.1e}")
    return rows


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def run_kernel_bench(cfg: KernelBenchConfig, log: Callable[[str], None] = lambda s: None) -> dict:
    """Time every shape and M; returns a JSON-ready dict with the rows and per-M geomean speedups."""
    import torch
    import triton

    from llmctl_kernels.launch import pdl_enabled
    from llmctl_kernels.w4a16 import device_name

    if not torch.cuda.is_available():
        raise DeviceUnavailableError("no CUDA device: `llmctl bench kernels` times GPU kernels",
                                     hint="run it on a machine with an NVIDIA GPU")
    device = torch.device("cuda")
    copy_gbps = measure_copy_bandwidth(device)
    pdl = pdl_enabled(device)
    log(f"{device_name(device)}: copy bandwidth {copy_gbps:.0f} GB/s, programmatic dependent launch "
        f"{'on' if pdl else 'off (LLMCTL_PDL=0 or before sm_90)'}")
    rows = []
    for name, k, n in cfg.shapes:
        rows += _bench_shape(name, k, n, cfg, copy_gbps, log)
    summary = {}
    for m in cfg.batch_sizes:
        mine = [r for r in rows if r["m"] == m]
        summary[m] = {"speedup_geomean": geomean([r["speedup"] for r in mine]),
                      "bw_share_mean": sum(r["bw_share"] for r in mine) / len(mine)}
        if cfg.act_order:
            summary[m]["act_order_slowdown_geomean"] = geomean([r["act_order_us"] / r["w4a16_us"] for r in mine])
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton.__version__,
            "copy_gbps": copy_gbps, "group_size": cfg.group_size, "dtype": "float16", "pdl": pdl, "rows": rows,
            "summary": summary}


def render_table(result: dict):
    """A rich table: one line per shape and M, then the geomean per M."""
    from rich.table import Table

    table = Table(title=f"W4A16 vs cuBLAS fp16 on {result['device']} (group {result['group_size']}, "
                        f"copy {result['copy_gbps']:.0f} GB/s, PDL {'on' if result.get('pdl') else 'off'})")
    for col in ("shape", "M", "fp16 us", "w4a16 us", "speedup", "GB/s", "% copy BW", "act-order us", "eager x", "path"):
        table.add_column(col, justify="left" if col in ("shape", "path") else "right")
    for r in result["rows"]:
        act = f"{r['act_order_us']:.1f}" if "act_order_us" in r else "-"
        eager = f"{r['eager_fp16_us'] / r['eager_w4a16_us']:.2f}x" if "eager_w4a16_us" in r else "-"
        table.add_row(r["shape"], str(r["m"]), f"{r['fp16_us']:.1f}", f"{r['w4a16_us']:.1f}", f"{r['speedup']:.2f}x",
                      f"{r['gbps']:.0f}", f"{100 * r['bw_share']:.0f}%", act, eager, r["path"])
    for m, s in result["summary"].items():
        act = f"x{s['act_order_slowdown_geomean']:.2f}" if "act_order_slowdown_geomean" in s else "-"
        table.add_row("geomean", str(m), "", "", f"{s['speedup_geomean']:.2f}x", "",
                      f"{100 * s['bw_share_mean']:.0f}%", act, "", "", style="bold")
    return table
