"""Rank 0's side of a tensor-parallel engine: the worker ranks it spawns (llmctl.engine.worker
runs in each), the pipes they report on, the monitor that notices one dying, and the shutdown
that leaves none behind. Under torchrun there is no group: the launcher started every rank.

    rank 0: TensorParallelRuntime ─► WorkerGroup (spawn) ─► load own shard ─► wait_loaded ─► init_group
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing.connection
import os
import signal
import threading
import time
from typing import Any, Callable

from llmctl.engine.distributed import CMD_SHUTDOWN, Rendezvous, StepChannel, TensorParallelError, destroy_group
from llmctl.engine.worker import worker_main

logger = logging.getLogger("llmctl.engine")


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


class WorkerGroup:
    """Rank 0's handle on ranks 1..N-1: each a fresh interpreter (spawned, so nothing of rank
    0's state is inherited and a user's script is never re-imported), told its settings on
    stdin, reporting "loaded" or its error on a pipe; a pidfd tells rank 0 when it exits."""

    def __init__(self, config: Any, load_format: str, rendezvous: Rendezvous) -> None:
        import pickle
        import subprocess
        import sys

        self.procs: dict[int, Any] = {}
        self.conns: dict[int, Any] = {}
        self.pidfds: dict[int, int] = {}
        self.error: TensorParallelError | None = None
        self._on_death: list[Callable[[TensorParallelError], None]] = []
        self._stopping = False
        self._monitor: threading.Thread | None = None
        settings = pickle.dumps((config, load_format, rendezvous))  # our own frozen dataclasses
        for rank in range(1, rendezvous.world_size):
            read_fd, write_fd = os.pipe()
            cmd = [sys.executable, "-c", "from llmctl.engine.worker import main; main()",
                   str(rank), str(write_fd), str(os.getpid())]
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, pass_fds=(write_fd,), start_new_session=False)
            os.close(write_fd)
            proc.stdin.write(settings)
            proc.stdin.close()
            self.procs[rank] = proc
            self.conns[rank] = multiprocessing.connection.Connection(read_fd, writable=False)
            self.pidfds[rank] = os.pidfd_open(proc.pid)

    def _alive(self, rank: int) -> bool:
        return self.procs[rank].poll() is None

    def _message(self, rank: int) -> str | None:
        conn = self.conns[rank]
        try:
            if conn.poll():
                kind, text = conn.recv()
                return text if kind == "error" else None
        except (EOFError, OSError):
            pass
        return None

    def _death(self, rank: int, detail: str | None = None) -> TensorParallelError:
        proc = self.procs[rank]
        try:
            proc.wait(1.0)
        except Exception:
            pass
        detail = detail or self._message(rank)
        reason = _exit_reason(proc.returncode)
        return TensorParallelError(f"tensor-parallel rank {rank} died ({reason})" + (f": {detail}" if detail else ""),
                                   hint="the engine cannot go on without it; restart it")

    def wait_loaded(self, timeout_s: float) -> None:
        """Until every rank has loaded its shard; a rank that fails, dies or is late raises."""
        deadline = time.monotonic() + timeout_s
        pending = set(self.procs)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                self.shutdown()
                raise TensorParallelError(f"tensor-parallel rank(s) {', '.join(map(str, sorted(pending)))} did not "
                                          f"load and join within {timeout_s:.0f} s",
                                          hint="raise LLMCTL_TP_JOIN_TIMEOUT for a slow disk or a large model")
            waitables = {self.conns[r]: r for r in pending} | {self.pidfds[r]: r for r in pending}
            for ready in multiprocessing.connection.wait(list(waitables), timeout=min(left, 1.0)):
                rank = waitables[ready]
                if rank not in pending:
                    continue
                message = self._recv(rank) if ready is self.conns[rank] else None
                if message is not None and message[0] == "loaded":
                    pending.discard(rank)
                    continue
                err = self._death(rank, message[1] if message else None)
                self.shutdown()
                raise err

    def _recv(self, rank: int) -> tuple[str, Any] | None:
        try:
            return self.conns[rank].recv()
        except (EOFError, OSError):
            return None

    # ---- after start-up ------------------------------------------------------------
    def on_death(self, callback: Callable[[TensorParallelError], None]) -> None:
        self._on_death.append(callback)

    def start_monitor(self) -> None:
        self._monitor = threading.Thread(target=self._watch, name="llmctl-tp-monitor", daemon=True)
        self._monitor.start()

    def _watch(self) -> None:
        sentinels = dict((fd, r) for r, fd in self.pidfds.items())
        try:
            ready = multiprocessing.connection.wait(list(sentinels))
        except (OSError, ValueError):  # closed by shutdown
            return
        if self._stopping:
            return
        self.error = self._death(sentinels[ready[0]])
        logger.error("%s", self.error)
        _abort_collectives()
        for callback in self._on_death:
            try:
                callback(self.error)
            except Exception:
                logger.exception("tensor-parallel death callback failed")

    def wait_for_error(self, timeout_s: float = 5.0) -> TensorParallelError | None:
        """The dead rank's error, waiting up to `timeout_s` for the monitor to see the death
        (a collective may fail a moment before the process is reaped)."""
        start = time.monotonic()
        while self.error is None and time.monotonic() < start + timeout_s:
            if all(self._alive(r) for r in self.procs) and time.monotonic() > start + 1.0:
                break  # nobody died: the collective failed for another reason
            time.sleep(0.02)
        return self.error

    def shutdown(self, channel: StepChannel | None = None, timeout_s: float = 5.0) -> None:
        """Stop every rank: ask them (when the channel still works), then terminate, then kill."""
        self._stopping = True
        if channel is not None and self.error is None and all(self._alive(r) for r in self.procs):
            try:
                channel.send([CMD_SHUTDOWN], [])
            except Exception:  # a peer is gone; the signals below stop the rest
                pass
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            for stop in (None, proc.terminate, proc.kill):
                if stop is not None and proc.poll() is None:
                    stop()
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()) if stop is None else 2.0)
                    break
                except Exception:  # still running: the next, harder, signal
                    continue
        for rank, conn in self.conns.items():
            conn.close()
            os.close(self.pidfds[rank])
        self.conns, self.pidfds = {}, {}


class TensorParallelRuntime:
    """Rank 0's side of tensor parallelism: where the ranks meet, the spawned workers (none
    under torchrun, which starts every rank itself) and the channel once all have joined."""

    def __init__(self, config: Any, load_format: str) -> None:
        from llmctl.layers.tensor_parallel import TensorParallel

        size = config.parallel.tensor_parallel_size
        launched = Rendezvous.from_env(size)
        self.rendezvous = launched or Rendezvous.local(size)
        rank = int(os.environ["RANK"]) if launched else 0
        if rank != 0:  # a worker rank started by torchrun: serve steps, never return
            worker_main(rank, config, load_format, self.rendezvous, None)
        self.tp = TensorParallel(0, size)
        self.workers = None if launched else WorkerGroup(config, load_format, self.rendezvous)
        self.channel: StepChannel | None = None
        atexit.register(self.shutdown)  # an interpreter that exits without shutdown still stops its ranks
        self._done = False

    def join(self, device: Any) -> StepChannel:
        from llmctl.engine.distributed import init_group, join_timeout_s

        if self.workers is not None:
            self.workers.wait_loaded(join_timeout_s())
        self.channel = init_group(self.tp, self.rendezvous, device, join_timeout_s())
        if self.workers is not None:
            self.workers.start_monitor()
        return self.channel

    def on_death(self, callback: Callable[[TensorParallelError], None]) -> None:
        if self.workers is not None:
            self.workers.on_death(callback)

    @property
    def error(self) -> TensorParallelError | None:
        return self.workers.error if self.workers is not None else None

    def check_ranks(self, err: BaseException | None = None) -> None:
        """Raise the error naming a rank that died. After a failed collective (`err`), wait
        a moment for the monitor to see the death behind it."""
        if self.workers is None:
            return
        # A collective that lost its peer raises RuntimeError (gloo, NCCL); a request's own fault does not.
        dead = self.workers.wait_for_error() if isinstance(err, RuntimeError) else self.workers.error
        if dead is not None:
            raise dead from err

    def shutdown(self) -> None:
        if self._done:
            return
        self._done = True
        atexit.unregister(self.shutdown)
        if self.workers is not None:
            self.workers.shutdown(self.channel)
            if self.workers.error is not None:
                return  # a peer is gone: tearing the group down could wait on it
        destroy_group()


def _abort_collectives() -> None:
    """A dead peer leaves an NCCL collective waiting forever: abort the communicators so the
    engine's step fails now (gloo fails by itself when the peer's sockets close)."""
    import torch.distributed as dist

    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort is None or not dist.is_initialized() or dist.get_backend() != "nccl":
        return
    try:
        abort()
    except Exception:  # best effort: the step then fails at the collective's timeout
        logger.exception("aborting the NCCL communicators failed")
