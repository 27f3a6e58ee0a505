"""W4A16 matmul over GPTQ weights: load-time preparation, per-M dispatch, the public launcher.

Public API (what `GPTQLinear` calls on CUDA):

    weights = prepare_w4a16_weights(qweight, qzeros, scales, g_idx, bits=4, zero_offset=1)
    out = w4a16_matmul(x, weights, bias=None)          # x: [..., K] fp16/bf16 -> [..., N]

Layout after preparation (`W4A16Weights`). 4-bit weights whose shapes allow it (K and the group
size multiples of 64, N of 16) are repacked into the fragment layout ("frag",
kernels/w4a16_frag.py): the order in which the tensor cores take the codes, so that a dequantized
tile needs no shared-memory round trip; all three paths read it. Other weights (2 and 8 bits, odd
shapes) keep the checkpoint's own tensors ("gptq"), unchanged when g_idx is in order.

With act-order, K is permuted once at load time, as vLLM does: rows of `qweight` are sorted by
group so that every group is a contiguous run of `group_size` rows again, and `perm` (int32 [K])
records where each row came from. The GEMVs read x[:, perm[k]] in the kernel; the GEMMs gather x
once before their launch (the frag GEMM in the launch that zeroes its split-K output); the
dequant path writes rows back to checkpoint order, so x needs no gather there.

    checkpoint  k:  0  1  2  3  4  5  ...      g_idx: 1 0 1 0 ...
    prepared    k': 1  3  ...  0  2  ...       perm:  [1, 3, ..., 0, 2, ...]   groups: 0 0 ... 1 1 ...

Only a g_idx whose sorted form is not runs of one size (never written by GPTQ) keeps `g_idx` and
takes the slower per-k gather (checkpoint layout only). Paths, chosen by M from
kernels/configs/w4a16.json (one table per layout):
`gemv` (split-K, no tensor cores), `gemm` (tensor cores, split-K at small M) and `dequant`
(dequantize to fp16, then cuBLAS), with thresholds and tile sizes measured per GPU. Two config
flags select inline-PTX variants that split a word into half-precision code pairs, two codes per
instruction (GPU only; the CPU interpreter runs a portable form): `HALF2` (GEMV, fp16 x: products
of a word rounded to fp16 and summed four at a time, fp32 between words) and `PAIRS` (GEMM: the
exact q - z enters the dot) for the checkpoint layout. docs/benchmarks.md has the measurements.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from llmctl_kernels.reference import pack_qweight, unpack_qweight
from llmctl_kernels.w4a16_frag import FRAG_K, FRAG_N, frag_eligible, repack_frag

PATHS = ("gemv", "gemm", "dequant")
LAYOUTS = ("frag", "gptq")
TRITON_BITS = (2, 4, 8)
_CONFIG_FILE = Path(__file__).parent / "configs" / "w4a16.json"


@dataclass(frozen=True)
class W4A16Weights:
    """GPTQ weights in the layout the kernels read (see the module docstring)."""

    qweight: torch.Tensor  # gptq: int32 [K*bits/32, N], rows in group order; frag: int32 [K/64, N/16, 128]
    qzeros: torch.Tensor  # int32 [G, N*bits/32]
    scales: torch.Tensor  # fp16/bf16 [G, N]
    perm: torch.Tensor | None  # int32 [K]: source column of x for each prepared row
    g_idx: torch.Tensor | None  # int32 [K]: only for irregular groups, else None
    bits: int
    group_size: int  # rows per group after preparation (K when the checkpoint has one group)
    zero_offset: int  # 1 for checkpoint format gptq (v1), 0 for gptq_v2
    in_features: int
    out_features: int
    layout: str = "gptq"  # "frag" or "gptq" (the module docstring)


def _uniform_group_size(sorted_g_idx: torch.Tensor, num_groups: int, vals: int) -> int | None:
    """The run length if sorted g_idx is arange(K) // size (last run may be short), else None."""
    k = sorted_g_idx.numel()
    size = int((sorted_g_idx == 0).sum())
    if size == 0 or size % vals or -(-k // size) != num_groups:
        return None
    expect = torch.arange(k, device=sorted_g_idx.device) // size
    return size if torch.equal(sorted_g_idx.to(torch.long), expect) else None


def prepare_w4a16_weights(
    qweight: torch.Tensor,  # int32 [K*bits/32, N]
    qzeros: torch.Tensor,  # int32 [G, N*bits/32]
    scales: torch.Tensor,  # fp16/bf16 [G, N]
    g_idx: torch.Tensor | None,  # int [K]; None means groups in order (size K/G)
    bits: int = 4,
    zero_offset: int = 1,
    layout: str | None = None,  # None: "frag" where eligible, else "gptq"
) -> W4A16Weights:
    """Check a GPTQ linear's tensors and put them in kernel order (once, at load time)."""
    if bits not in TRITON_BITS:
        raise ValueError(f"bits={bits}: the Triton kernels support {TRITON_BITS}; use kernels.reference for others")
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dtype != torch.int32 or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    if scales.dtype not in (torch.float16, torch.bfloat16) or scales.dim() != 2:
        raise ValueError(f"scales must be 2-D fp16/bf16, got {scales.dtype} {tuple(scales.shape)}")
    vals = 32 // bits
    k, n = qweight.shape[0] * vals, qweight.shape[1]
    num_groups = scales.shape[0]
    if scales.shape[1] != n or qzeros.shape != (num_groups, n // vals) or n % vals:
        raise ValueError(f"scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} "
                         f"do not fit qweight [{k // vals}, {n}]")
    if g_idx is None:
        g_idx = torch.arange(k, device=qweight.device) // -(-k // num_groups)
    if g_idx.shape != (k,):
        raise ValueError(f"g_idx must have shape [{k}], got {tuple(g_idx.shape)}")
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= num_groups:
        raise ValueError(f"g_idx values must lie in [0, {num_groups})")
    perm = None
    sorted_g, order = torch.sort(g_idx.to(torch.long), stable=True)
    group_size = _uniform_group_size(sorted_g, num_groups, vals)
    kept_g_idx = None
    if group_size is None:
        kept_g_idx = g_idx.to(torch.int32).contiguous()
        group_size = k
    elif not torch.equal(order, torch.arange(k, device=order.device)):
        perm = order.to(torch.int32).contiguous()
        qweight = pack_qweight(unpack_qweight(qweight, bits)[order], bits)
    eligible = frag_eligible(bits, k, n, group_size, kept_g_idx is not None)
    if layout is None:
        layout = "frag" if eligible else "gptq"
    elif layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    elif layout == "frag" and not eligible:
        raise ValueError(f"the frag layout needs 4-bit codes, K and the group size multiples of {FRAG_K} and N of "
                         f"{FRAG_N}; got bits={bits}, K={k}, N={n}, group size {group_size}")
    if layout == "frag":
        qweight = repack_frag(qweight)
    return W4A16Weights(
        qweight=qweight.contiguous(), qzeros=qzeros.contiguous(), scales=scales.contiguous(), perm=perm,
        g_idx=kept_g_idx, bits=bits, group_size=group_size, zero_offset=zero_offset, in_features=k, out_features=n,
        layout=layout,
    )


@functools.lru_cache(maxsize=None)
def _load_tables() -> dict:
    if not _CONFIG_FILE.exists():
        return {}
    return json.loads(_CONFIG_FILE.read_text())


# Used where no tuned table names the GPU (and under the CPU interpreter), per layout: the
# "default" rows measured on an H200 (kernels/configs/w4a16.json), the same SM generation as the H100.
FRAG_GEMV_DEFAULT = dict(BLOCK_N=256, BLOCK_K=64, SPLIT_K=16, num_warps=4, num_stages=1)
DEFAULT_TABLES = {
    "frag": [
        {"max_m": 16, "path": "gemm",
         "config": dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, SPLIT_K=8, SCALE_IN_A=0, num_warps=4, num_stages=4)},
        {"max_m": 32, "path": "gemm",
         "config": dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, SPLIT_K=8, SCALE_IN_A=0, num_warps=4, num_stages=3)},
        {"max_m": 64, "path": "gemm",
         "config": dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, SPLIT_K=4, SCALE_IN_A=0, num_warps=4, num_stages=3)},
        {"max_m": 128, "path": "gemm",
         "config": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=4, SCALE_IN_A=1, num_warps=8, num_stages=3)},
        {"max_m": 256, "path": "gemm",
         "config": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=2, SCALE_IN_A=1, num_warps=8, num_stages=3)},
        {"max_m": None, "path": "dequant", "config": {}},
    ],
    "gptq": [
        {"max_m": 1, "path": "gemv",
         "config": dict(BLOCK_N=256, BLOCK_KW=16, SPLIT_K=16, PREFETCH=0, HALF2=1, num_warps=4, num_stages=1)},
        {"max_m": 2, "path": "gemv",
         "config": dict(BLOCK_N=256, BLOCK_KW=8, SPLIT_K=16, PREFETCH=0, HALF2=1, num_warps=4, num_stages=1)},
        {"max_m": 16, "path": "gemm", "config": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=8, SWAP_AB=0,
                                                     GROUP_M=8, PACKED_LOAD=1, PREFETCH=0, num_warps=4, num_stages=3)},
        {"max_m": 32, "path": "gemm", "config": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, SWAP_AB=1,
                                                     GROUP_M=8, PACKED_LOAD=1, PREFETCH=0, INT_DOT=1, PAIRS=1,
                                                     num_warps=4, num_stages=3)},
        {"max_m": 64, "path": "gemm", "config": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, SWAP_AB=1,
                                                     GROUP_M=8, PACKED_LOAD=1, PREFETCH=0, INT_DOT=1, PAIRS=1,
                                                     num_warps=4, num_stages=3)},
        {"max_m": 128, "path": "gemm", "config": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2, SWAP_AB=1,
                                                      GROUP_M=8, PACKED_LOAD=1, PREFETCH=0, INT_DOT=1, PAIRS=1,
                                                      num_warps=4, num_stages=3)},
        {"max_m": None, "path": "dequant", "config": {}},
    ],
}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def select_path(m: int, n: int, k: int, device: torch.device, layout: str = "frag") -> tuple[str, dict]:
    """(path, config) for an [m, k] x [k, n] product over `layout`: the tuned table for this GPU and shape."""
    path, config = _select_path(m, n, k, device, layout)
    return path, dict(config)


@functools.lru_cache(maxsize=4096)
def _select_path(m: int, n: int, k: int, device: torch.device, layout: str) -> tuple[str, dict]:
    per_device = _load_tables().get("devices", {}).get(device_name(device), {}).get(layout, {})
    table = per_device.get(f"{n}x{k}") or per_device.get("default") or DEFAULT_TABLES[layout]
    for row in table:
        if row["max_m"] is None or m <= row["max_m"]:
            return row["path"], dict(row["config"])
    return table[-1]["path"], dict(table[-1]["config"])


def w4a16_matmul(
    x: torch.Tensor,  # [..., K] fp16/bf16
    weights: W4A16Weights,
    bias: torch.Tensor | None = None,  # [N]
    *,
    path: str | None = None,
    config: dict | None = None,
    out: torch.Tensor | None = None,  # [M, N]; for tests (poisoned outputs) and the tuner
) -> torch.Tensor:
    """x @ dequant(W) (+ bias) -> [..., N] in x's dtype, fp32 accumulation."""
    from llmctl_kernels.w4a16_dequant import w4a16_dequant_matmul
    from llmctl_kernels.w4a16_frag import frag_gemm, frag_gemv
    from llmctl_kernels.w4a16_gemm import w4a16_gemm
    from llmctl_kernels.w4a16_gemv import w4a16_gemv

    k, n = weights.in_features, weights.out_features
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x must be fp16 or bf16, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the weights {k}")
    if x.device != weights.qweight.device:
        raise ValueError(f"x is on {x.device}, the weights on {weights.qweight.device}")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{n}] tensor, got {tuple(bias.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if out is None:
        out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    elif out.shape != (m, n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{m}, {n}] {x.dtype} tensor")
    if m == 0:
        return out.reshape(*lead, n)
    if path is None:
        path, picked = _select_path(m, n, k, x.device, weights.layout)  # not copied: the launchers only read it
        if path == "gemv" and weights.layout == "frag" and x.dtype == torch.bfloat16:
            # The tables are measured with fp16 x; with bf16 the GEMV's fp32 arithmetic loses to the
            # tensor cores (H200, M=1: 9-16% on qkv, o and down), so take the choice for M=2.
            path, picked = _select_path(2, n, k, x.device, weights.layout)
        config = config or picked
    elif config is None:
        config = next((dict(row["config"]) for row in DEFAULT_TABLES[weights.layout] if row["path"] == path), None)
        if config is None:  # the frag GEMV, which the default rows do not take: the H100's pick at M=1
            config = dict(FRAG_GEMV_DEFAULT) if path == "gemv" else {}
    frag = weights.layout == "frag"
    if path == "gemv":
        (frag_gemv if frag else w4a16_gemv)(x2, weights, bias, out, config)
    elif path == "gemm":
        (frag_gemm if frag else w4a16_gemm)(x2, weights, bias, out, config)
    elif path == "dequant":
        w4a16_dequant_matmul(x2, weights, bias, out)
    else:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    return out.reshape(*lead, n)
