"""How the kernels are launched: under the Triton interpreter or not, and with programmatic
dependent launch.

Programmatic dependent launch (Hopper and later): each kernel of the decode path lets the next
one launch while it runs, and the W4A16 kernels stream their weights in that time.

Why. In a captured decode step every kernel waits for the one before it to finish, then pays its
own launch, its first memory round trip and its tail: a few microseconds each, about as long as a
4-bit linear of a small layer takes to stream its weights. With programmatic dependent launch
(PDL) a kernel launched with the attribute may start as soon as every program of the kernel before
it has signalled (`griddepcontrol.launch_dependents`); it must then wait (`griddepcontrol.wait`:
the previous kernel complete and its writes visible) before it reads anything that kernel may
write, or writes anything at all. What it may do before the wait is read what no kernel writes:
a linear's weights, scales and zero points. The W4A16 kernels prefetch their slice of the weights
into L2 there, so the weight stream overlaps the previous kernel's tail and the launch gap.

Protocol, for every kernel launched with `launch_pdl=True` (through `launch_options`):
- `pdl_enter(PDL)` (`pdl_signal`, then `pdl_wait`) before the first access to activations,
  caches or outputs; the signal comes first, so the next kernel's launch overlaps this one's work;
- nothing but loads of immutable tensors before it.
Waits are transitive (a kernel completes only after its own wait returned), so a kernel that
passed its wait sees the writes of every kernel before it in the stream. Kernels launched without
the attribute (torch's, cuBLAS's, memsets) are ordinary stream dependencies. CUDA-graph capture
keeps the attribute.

`LLMCTL_PDL=0` in the environment (or `set_pdl(False)`) turns it off; it is off in the Triton
interpreter and before sm_90.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """Running under the Triton interpreter (TRITON_INTERPRET=1: the kernels' CPU path)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")

_ENABLED = os.environ.get("LLMCTL_PDL", "1").lower() not in ("0", "false", "off")


def set_pdl(enabled: bool) -> bool:
    """Turn PDL on or off for launches from now on (a graph keeps what it captured); returns the
    previous setting."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(enabled)
    return previous


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    return _ENABLED and device.type == "cuda" and not interpreting() and _capable(device.index or 0)


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for a launch: the kernel's `PDL` constexpr and Triton's `launch_pdl`."""
    on = pdl_enabled(device)
    return {"PDL": on, "launch_pdl": on} if on else {"PDL": False}


@triton.jit
def pdl_signal(PDL: tl.constexpr):
    """Let the next kernel launch (once every program of this one has signalled or exited)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait until the previous kernel has completed and its writes are visible."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """Signal, then wait: the entry of a kernel with nothing to do before its wait."""
    pdl_signal(PDL)
    pdl_wait(PDL)


PREFETCH_L2_PTX = tl.constexpr("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;")


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the 128-byte lines at ptrs (no registers wait for them)."""
    tl.inline_asm_elementwise(PREFETCH_L2_PTX, "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1)
