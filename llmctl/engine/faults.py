"""Which errors inside an engine step belong to one request, and which leave the engine unusable.

A step runs many requests in one batch, so an error does not say whose it is. `LLMEngine.step`
asks `is_request_fault`: if the error could come from one request's values or size (a value
that slipped past admission, an out-of-memory error), it runs the step's sequences one by one
and fails only the requests that fail alone. Anything else (a device error, a broken model, a
bug in the engine) is an `EngineDeadError`: the server reports it on /health and exits.
"""

from __future__ import annotations

import torch

from llmctl.errors import EngineDeadError, LlmctlError, RequestFailedError

# Errors a request's own values or size can cause.
_REQUEST_FAULTS = (LlmctlError, ValueError, IndexError, OverflowError, UnicodeError, MemoryError,
                   torch.OutOfMemoryError)
# Device failures leave the CUDA context unusable; CUDA out-of-memory does not.
_DEVICE_MARKERS = ("CUDA error", "device-side assert", "illegal memory access", "NCCL", "cuBLAS error",
                   "CUBLAS_STATUS", "unspecified launch failure")


def is_device_fault(err: BaseException) -> bool:
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(err, accelerator_error):
        return True
    if isinstance(err, torch.OutOfMemoryError):
        return False
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _DEVICE_MARKERS)


def is_request_fault(err: BaseException) -> bool:
    """True when `err` may belong to one request of the step rather than to the engine."""
    if isinstance(err, EngineDeadError) or is_device_fault(err):
        return False
    return isinstance(err, _REQUEST_FAULTS)


def request_error(err: BaseException) -> LlmctlError:
    """What the failed request's client is told."""
    if isinstance(err, LlmctlError):
        return err
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return RequestFailedError("the engine ran out of memory serving this request",
                                  hint="retry with a shorter prompt, fewer samples or without prompt_logprobs")
    return RequestFailedError(f"the engine failed this request ({type(err).__name__})")


def engine_dead(err: BaseException) -> EngineDeadError:
    if isinstance(err, EngineDeadError):
        return err
    dead = EngineDeadError(f"the engine cannot run a step: {type(err).__name__}: {err}")
    dead.__cause__ = err
    return dead
