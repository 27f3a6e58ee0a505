"""Which errors inside an engine step belong to one request, and which leave the engine unusable.

A step runs many requests in one batch, so an error does not say whose it is. `LLMEngine.step`
asks `is_request_fault`: if the error could come from one request's values or size (a value
that slipped past admission, an out-of-memory error), it runs the step's sequences one by one
and fails only the requests that fail alone. Anything else (a device error, a broken model, a
bug in the engine) is an `EngineDeadError`: the server reports it on /health and exits.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from llmctl.engine.model_runner import ModelRunnerOutput
from llmctl.engine.scheduler import SchedulerOutput
from llmctl.errors import EngineDeadError, LlmctlError, RequestFailedError

logger = logging.getLogger("llmctl.engine")

# (scheduled batch, generators, prompt-logprob starts, scorers) -> the runner's result
RunBatch = Callable[[SchedulerOutput, dict, dict, dict], ModelRunnerOutput]

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


def execute_isolated(run: RunBatch, out: SchedulerOutput, generators: dict, prompt_lp_from: dict, scorers: dict
                     ) -> tuple[ModelRunnerOutput, dict[str, BaseException]]:
    """The runner's result for the step, and the requests it failed (request id -> error).

    When the batch fails with an error one request could cause (`is_request_fault`), its
    sequences run again one by one (their K/V writes are the same again) and only the requests
    that fail alone fail; any other error is an EngineDeadError."""
    try:
        return run(out, generators, prompt_lp_from, scorers), {}
    except Exception as err:
        if not is_request_fault(err):
            raise engine_dead(err) from err
        logger.warning("a step of %d sequences failed (%s: %s); running them one by one",
                       len(out.scheduled), type(err).__name__, err)
    entries = out.scheduled
    merged = ModelRunnerOutput([None] * len(entries), [None] * len(entries), {})
    failures: dict[str, BaseException] = {}
    for i, e in enumerate(entries):
        seq = e.seq
        if seq.request_id in failures:
            continue
        # The step's copy-on-write runs with the first sequence, on every rank.
        single = SchedulerOutput([e], out.blocks_to_copy if i == 0 else [], e.num_new_tokens)

        def mine(d: dict) -> dict:
            return {k: v for k, v in d.items() if k == seq.seq_id}

        try:
            r = run(single, mine(generators), mine(prompt_lp_from), mine(scorers))
        except Exception as err:
            if not is_request_fault(err):
                raise engine_dead(err) from err
            logger.warning("request %s failed in a step: %s: %s", seq.request_id, type(err).__name__, err)
            failures[seq.request_id] = err
            continue
        merged.sampled_token_ids[i], merged.logprobs[i] = r.sampled_token_ids[0], r.logprobs[0]
        merged.prompt_logprobs.update(r.prompt_logprobs)
        merged.prompt_scores.update(r.prompt_scores)
    for i, e in enumerate(entries):  # a request fails as a whole: drop its other rows' results
        if e.seq.request_id in failures:
            merged.sampled_token_ids[i] = merged.logprobs[i] = None
            merged.prompt_logprobs.pop(e.seq.seq_id, None)
            merged.prompt_scores.pop(e.seq.seq_id, None)
    return merged, failures
