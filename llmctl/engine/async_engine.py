"""`AsyncEngine`: the server's front of `LLMEngine`.

One thread owns the engine and steps it; asyncio handlers talk to it through a
command list (add, abort) and get each request's outputs on their own asyncio
queue. Keeping the engine on one thread means it needs no locks, and the event
loop stays free to serve HTTP while a step runs (torch drops the GIL in its ops).

    handler ──add/abort──► commands ──► engine thread: apply, step() ──► stream queues ──► handler
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

from llmctl.engine.outputs import RequestOutput
from llmctl.errors import EngineDeadError, LlmctlError, RequestFailedError, ShuttingDownError
from llmctl.sampling_params import SamplingParams

logger = logging.getLogger("llmctl.engine")

# (stats, outputs of the step) -> None, called on the engine thread after every step.
StepHook = Callable[[Any, list[RequestOutput]], None]


class QueueFullError(LlmctlError):
    """More requests are waiting than the server takes (scheduler.max_waiting)."""

    status_code = 503


class _Stream:
    """One request's outputs, fed from the engine thread, read by one handler."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, final_only: bool = False) -> None:
        self.request_id = request_id
        self.loop = loop
        self.final_only = final_only  # the handler reads the finished output only
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False

    def put(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


def _snapshot(out: RequestOutput) -> RequestOutput:
    """A copy the handler may read while the engine keeps appending to its own lists."""
    outputs = [dataclasses.replace(c, token_ids=list(c.token_ids),
                                   logprobs=None if c.logprobs is None else list(c.logprobs))
               for c in out.outputs]
    return dataclasses.replace(out, outputs=outputs)


class AsyncEngine:
    """Async access to an `LLMEngine` (anything with add_request/step/abort_request/
    has_unfinished_requests/get_stats) stepped by one background thread."""

    def __init__(self, engine: Any, max_num_unfinished: int | None = None, step_hook: StepHook | None = None,
                 abort_hook: Callable[[str], None] | None = None) -> None:
        self.engine = engine
        self.max_num_unfinished = max_num_unfinished
        self.step_hook = step_hook
        self.abort_hook = abort_hook  # told, on the engine thread, of each request aborted unfinished
        self._cv = threading.Condition()
        self._commands: list[tuple] = []
        self._streams: dict[str, _Stream] = {}  # only the event loop thread mutates it
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._draining = False
        self.dead_error: BaseException | None = None
        # Called on the engine thread when the engine dies (the server then stops and exits non-zero).
        self.on_dead: Callable[[BaseException], None] | None = None
        self.stats: Any = None
        on_fatal = getattr(engine, "on_fatal", None)
        if on_fatal is not None:  # e.g. a tensor-parallel rank died
            on_fatal(self._fatal)

    # --- life cycle --------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self.stats = self._read_stats()
        self._thread = threading.Thread(target=self._run, name="llmctl-engine", daemon=True)
        self._thread.start()

    def begin_drain(self, grace_s: float) -> None:
        """(Event loop.) Take no new request; end those still running after grace_s with
        ShuttingDownError, which their handlers answer as a 503 or a stream's error event."""
        if self._draining:
            return
        self._draining = True
        asyncio.get_running_loop().call_later(grace_s, self._expire_streams)

    def _expire_streams(self) -> None:
        for request_id, stream in list(self._streams.items()):
            stream.put(ShuttingDownError("the server shut down before this request finished",
                                         hint="retry it on another replica or after the restart"))
            self.abort(request_id)

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Abort what is left, stop the thread. Handlers still waiting get a 503."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout_s)
        for stream in list(self._streams.values()):
            stream.put(ShuttingDownError("the server is shutting down"))
        self._streams.clear()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead_error is None

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    # --- requests (call from the event loop) ---------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None, final_only: bool = False) -> _Stream:
        if self.dead_error is not None:
            raise EngineDeadError("the engine is not running", hint=self.dead_reason())
        if self._stopping or self._draining:
            raise ShuttingDownError("the server is shutting down and takes no new request")
        if self.max_num_unfinished is not None and len(self._streams) >= self.max_num_unfinished:
            raise QueueFullError(f"the server is at its limit of {self.max_num_unfinished} requests in flight",
                                 hint="retry later, or raise --max-num-seqs / scheduler.max_waiting")
        if request_id in self._streams:
            raise RequestFailedError(f"request id {request_id!r} is already in flight")
        stream = _Stream(request_id, asyncio.get_running_loop(), final_only)
        self._streams[request_id] = stream
        self._command(("add", request_id, list(prompt_token_ids), params, arrival_time or time.time()))
        return stream

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self._command(("abort", request_id))

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float | None = None, final_only: bool = False) -> AsyncIterator[RequestOutput]:
        """Submit now (a full queue or a dead engine raises here, before any response starts)
        and return the request's cumulative outputs (with `final_only`, the finished one alone:
        no copy of the growing output and no event-loop wake-up per step); closing or
        cancelling the iterator before the end aborts the request. The step hook sees every
        step's outputs either way."""
        stream = self.add_request(request_id, prompt_token_ids, params, arrival_time, final_only)
        iterator = self._iterate(stream)
        # An iterator dropped before its first step never runs its `finally`: abort then too.
        weakref.finalize(iterator, self._abort_soon, stream.loop, request_id)
        return iterator

    def _abort_soon(self, loop: asyncio.AbstractEventLoop, request_id: str) -> None:
        try:
            loop.call_soon_threadsafe(self.abort, request_id)
        except RuntimeError:  # the loop is closed; shutdown aborts everything anyway
            pass

    async def _iterate(self, stream: _Stream) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    stream.finished = True
                    raise item
                stream.finished = item.finished
                yield item
                if stream.finished:
                    return
        finally:
            if stream.finished:
                self._streams.pop(stream.request_id, None)
            else:
                self.abort(stream.request_id)

    def _command(self, cmd: tuple) -> None:
        with self._cv:
            self._commands.append(cmd)
            self._cv.notify()

    def _fatal(self, err: BaseException) -> None:
        """The engine became unusable outside a step (called from a monitor thread): /health
        turns 503 and the server stops now, even if the engine thread is stuck in a collective;
        an idle loop wakes and dies on the error."""
        if self.dead_error is None:
            self.dead_error = err
        self._command(("fail", err))
        if self.on_dead is not None:
            self.on_dead(err)

    def dead_reason(self) -> str | None:
        if self.dead_error is None:
            return None
        return f"engine loop died: {type(self.dead_error).__name__}: {self.dead_error}"

    # --- the engine thread ----------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._loop_once():
                pass
        except BaseException as err:  # the loop is gone: say so to everyone waiting
            logger.exception("engine loop died")
            self.dead_error = err
            dead = EngineDeadError("the engine stopped working; the server is restarting or must be restarted")
            for stream in list(self._streams.values()):
                stream.put(dead)
            if self.on_dead is not None:
                self.on_dead(err)
            return
        self._abort_all()

    def _loop_once(self) -> bool:
        with self._cv:
            while not self._commands and not self._stopping and not self.engine.has_unfinished_requests():
                self._cv.wait()
            commands, self._commands = self._commands, []
            if self._stopping:
                return False
        for cmd in commands:
            self._apply(cmd)
        outputs: list[RequestOutput] = []
        if self.engine.has_unfinished_requests():
            outputs = self.engine.step()
            for out in outputs:
                self._deliver(out)
        self.stats = self._read_stats()
        if self.step_hook is not None:
            try:
                self.step_hook(self.stats, outputs)
            except Exception:  # metrics must never take serving down
                logger.exception("step hook failed")
        return True

    def _apply(self, cmd: tuple) -> None:
        if cmd[0] == "fail":  # the engine is unusable: the loop dies as if a step had failed
            raise cmd[1]
        if cmd[0] == "abort":
            self._abort_in_engine(cmd[1])
            return
        _, request_id, prompt_token_ids, params, arrival_time = cmd
        try:
            self.engine.add_request(request_id, prompt_token_ids, params, arrival_time=arrival_time)
        except Exception as err:  # this request fails, the loop lives on
            stream = self._streams.get(request_id)
            if stream is not None:
                failure = err if isinstance(err, LlmctlError) else RequestFailedError(f"{type(err).__name__}: {err}")
                stream.put(failure)

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:  # aborted since the step began
            return
        if out.error is not None:  # the step failed this request alone
            stream.put(out.error)
        elif out.finished or not stream.final_only:
            stream.put(_snapshot(out))

    def _read_stats(self) -> Any:
        get_stats = getattr(self.engine, "get_stats", None)
        return get_stats() if get_stats is not None else {}

    def _abort_in_engine(self, request_id: str) -> None:
        aborted = self.engine.abort_request(request_id)
        if self.abort_hook is not None and aborted:
            try:
                self.abort_hook(request_id)
            except Exception:  # metrics must never take serving down
                logger.exception("abort hook failed")

    def _abort_all(self) -> None:
        for request_id in list(self._streams):
            try:
                self._abort_in_engine(request_id)
            except Exception:
                logger.exception("abort of %s failed during shutdown", request_id)
