"""A worker rank of a tensor-parallel engine: one process per rank 1..N-1, started by rank 0
(llmctl.engine.worker_group) or by torchrun, that loads its shard and runs the steps rank 0
broadcasts until told to stop. It reports "loaded" or its error on a pipe, and exits when
rank 0 is gone, even SIGKILLed.

    rank r: main ─► load shard ─► "loaded" ─► init_group ─► serve_steps
"""

from __future__ import annotations

import multiprocessing.connection
import os
import signal
import threading
import time
import traceback
from typing import Any

from llmctl.engine.distributed import (
    CMD_ALLOCATE,
    CMD_CAPTURE,
    CMD_MEMORY,
    CMD_PROFILE,
    CMD_SHUTDOWN,
    CMD_WORKSPACES,
    Rendezvous,
    StepChannel,
    TensorParallelError,
    destroy_group,
)
from llmctl.engine.step_batch import KIND_STEP, from_wire


def _watch_parent(parent_pid: int) -> None:
    """A worker whose engine process is gone (even SIGKILLed) exits instead of lingering."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def main() -> None:
    """`python -c "from llmctl.engine.worker import main; main()" RANK FD PARENT_PID`, settings on stdin."""
    import pickle
    import sys

    rank, fd, parent_pid = (int(a) for a in sys.argv[1:4])
    config, load_format, rendezvous = pickle.loads(sys.stdin.buffer.read())
    worker_main(rank, config, load_format, rendezvous, multiprocessing.connection.Connection(fd, readable=False),
                parent_pid)


def worker_main(rank: int, config: Any, load_format: str, rendezvous: Rendezvous, conn: Any,
                parent_pid: int | None = None) -> None:
    """Entry of a worker rank (spawned by WorkerGroup, or rank > 0 under torchrun)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: rank 0 stops us
    if parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    try:
        runner, channel = _start_worker(rank, config, load_format, rendezvous, conn)
        serve_steps(runner, channel)
    except BaseException as err:  # tell rank 0 why, then go
        if conn is not None:
            try:
                conn.send(("error", f"{type(err).__name__}: {err}"))
            except OSError:
                pass
        if os.environ.get("LLMCTL_DEBUG"):
            traceback.print_exc()
        os._exit(1)
    destroy_group()
    os._exit(0)


def _start_worker(rank: int, config: Any, load_format: str, rendezvous: Rendezvous, conn: Any):
    import torch

    from llmctl.engine.distributed import device_for_rank, init_group, join_timeout_s, share_cpu_threads
    from llmctl.engine.loading import load_model_and_tokenizer
    from llmctl.engine.model_runner import ModelRunner
    from llmctl.layers.tensor_parallel import TensorParallel
    from llmctl.models.arch import resolve_dtype
    from llmctl.models.loader import resolve_device

    tp = TensorParallel(rank, rendezvous.world_size)
    device = device_for_rank(resolve_device(config.model.device), rank)
    if device.type == "cpu":
        share_cpu_threads(tp.size)
    device_kind = "gpu" if device.type == "cuda" else "cpu"
    torch.manual_seed(config.model.seed)
    model, arch, _, _, _ = load_model_and_tokenizer(config.model, load_format, device, device_kind,
                                                    lambda msg: None, tp=tp, with_tokenizer=False)
    if conn is not None:
        conn.send(("loaded", rank))
    channel = init_group(tp, rendezvous, device, join_timeout_s())
    dtype = getattr(torch, resolve_dtype(config.model.dtype, arch, device_kind))
    return ModelRunner(model, arch, device, dtype, config.cache.block_size, None), channel


def serve_steps(runner: Any, channel: StepChannel) -> None:
    """Run what rank 0 broadcasts until it says stop."""
    import torch

    while True:
        header, payload = channel.recv()
        kind = header[0]
        if kind == KIND_STEP:
            for _ in runner.run_model(from_wire(header, payload)):
                pass
        elif kind == CMD_PROFILE:
            activation = runner.profile_activation_bytes(*payload)
            free, total = torch.cuda.mem_get_info(runner.device)
            channel.all_reduce_max([activation, total - free])
        elif kind == CMD_ALLOCATE:
            runner.allocate_kv_cache(payload[0])
        elif kind == CMD_CAPTURE:
            runner.capture_graphs(*payload)
        elif kind == CMD_WORKSPACES:
            runner.allocate_workspaces(*payload)
        elif kind == CMD_MEMORY:
            channel.all_gather(runner.memory_report())
        elif kind == CMD_SHUTDOWN:
            return
        else:
            raise TensorParallelError(f"rank {channel.rank}: unknown command {kind} from rank 0")
