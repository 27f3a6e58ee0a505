"""The launch configuration of a W4A16 product, one field per knob with one default, and the
per-GPU dispatch tables (tables.json, written by llmctl_kernels/w4a16/tune.py) that pick a path and a
configuration by M."""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

PATHS = ("gemv", "gemm", "dequant")
TABLES_FILE = Path(__file__).parent / "tables.json"


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and variants of one launch. A path reads the fields it has (docs per kernel:
    gemv.py, gemm.py, frag_gemm.py, frag_gemv.py); a 0 block size means "not set" and the launcher
    that needs it refuses the config."""

    BLOCK_M: int = 0
    BLOCK_N: int = 0
    BLOCK_K: int = 0  # GEMMs and the fragment GEMV, in codes
    BLOCK_KW: int = 0  # checkpoint GEMV, in packed words
    SPLIT_K: int = 1
    num_warps: int = 4
    num_stages: int = 1
    GATHER_X: int = 0  # act-order: 1 gathers x through perm inside the kernel, 0 once up front
    SWAP_AB: int = 0
    GROUP_M: int = 8
    PACKED_LOAD: int = 1
    PREFETCH: int = 0
    INT_DOT: int = 0
    PAIRS: int = 0
    HALF2: int = 0
    SCALE_IN_A: int = 0
    # Cache hints of the fragment kernels' loads (off until measured to win): 0 weights
    # evict_first, x plain (as tuned); 1 also x evict_last (kept in L2 for the other programs of
    # its row); 2 no hint at all.
    EVICT: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"KernelConfig.{f.name} must be a non-negative int, got {value!r}")
        if self.SPLIT_K < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"KernelConfig: SPLIT_K, num_warps and num_stages must be >= 1, got {self}")

    @classmethod
    def of(cls, config: "KernelConfig | dict") -> "KernelConfig":
        """A KernelConfig from a table row's dict (unknown keys are an error)."""
        if isinstance(config, cls):
            return config
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"unknown kernel config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: int(v) for k, v in config.items()})

    def require(self, *names: str) -> None:
        missing = [n for n in names if getattr(self, n) == 0]
        assert not missing, f"this path needs {missing} set in its config, got {self}"


# Used where no tuned table names the GPU (and under the CPU interpreter), per layout: the
# "default" rows measured on an H200 (tables.json), the same SM generation as the H100.
FRAG_GEMV_DEFAULT = dict(BLOCK_N=256, BLOCK_K=64, SPLIT_K=16, GATHER_X=1, num_warps=4, num_stages=1)
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


def default_config(path: str, layout: str) -> KernelConfig:
    """The configuration a path forced without one runs with: its first default row (the frag GEMV,
    which no default row takes: the H100's pick at M=1)."""
    if path == "gemv" and layout == "frag":
        return KernelConfig.of(FRAG_GEMV_DEFAULT)
    row = next((r for r in DEFAULT_TABLES[layout] if r["path"] == path), None)
    return KernelConfig.of(row["config"] if row else {})


@functools.lru_cache(maxsize=None)
def load_tables() -> dict:
    if not TABLES_FILE.exists():
        return {}
    return json.loads(TABLES_FILE.read_text())


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@functools.lru_cache(maxsize=4096)
def select_path(m: int, n: int, k: int, device: torch.device, layout: str = "frag") -> tuple[str, KernelConfig]:
    """(path, config) for an [m, k] x [k, n] product over `layout`: the tuned table for this GPU and shape."""
    per_device = load_tables().get("devices", {}).get(device_name(device), {}).get(layout, {})
    table = per_device.get(f"{n}x{k}") or per_device.get("default") or DEFAULT_TABLES[layout]
    row = next((r for r in table if r["max_m"] is None or m <= r["max_m"]), table[-1])
    return row["path"], KernelConfig.of(row["config"])


def clear_caches() -> None:
    """Forget the loaded tables (after the tuner rewrote them)."""
    load_tables.cache_clear()
    select_path.cache_clear()
