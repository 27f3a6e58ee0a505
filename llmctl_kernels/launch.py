"""How the kernels are launched: under the Triton interpreter or not, and with programmatic
dependent launch.

Programmatic dependent launch (PDL, Hopper and later). In a captured decode step each kernel
waits for the one before it to finish, then pays its own launch and the placement of its
programs. A kernel launched with PDL may be launched as soon as every program of the kernel before
it has signalled (`griddepcontrol.launch_dependents`) or exited; before it touches anything it
waits (`griddepcontrol.wait`: the previous kernel complete, its writes visible). Its launch then
overlaps the previous kernel's tail instead of following it.

Protocol for every kernel launched with `**launch_options(device)`:
- `pdl_wait(PDL)` before the first load or store (every kernel of the chain obeys it, so waits
  are transitive: a kernel completes only after its own wait returned);
- `pdl_signal(PDL)` where the next kernel may be launched: the W4A16 products signal after their
  main loop, so the next kernel's programs are placed while theirs are leaving; the other
  kernels signal by exiting. Signalled at entry, a kernel let its successor's successor launch
  too, whose programs then took SM slots beside the running ones and were placed unevenly (the
  down projection at M=16 after an RMSNorm: 23 -> 33 us on the H100).
Kernels launched without the attribute (torch's, cuBLAS's, memsets) are ordinary stream
dependencies. CUDA-graph capture keeps the attribute.

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
    if not _ENABLED or device.type != "cuda" or interpreting():
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


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
