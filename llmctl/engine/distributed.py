"""Joining the ranks of a tensor-parallel engine over torch.distributed, and the channel on
which rank 0 tells the others what to run.

    rank 0 (engine: scheduler, block manager, detokenizer, sampler)      ranks 1..N-1 (workers)
    StepChannel.send(header [8], payload [n])  ── gloo broadcast ──►     StepChannel.recv()
    model forward: all-reduces and the logits gather on the model's group (NCCL on CUDA, gloo on CPU)

The channel always runs over a gloo group of CPU tensors, so a step's arrays never make a
round trip through a GPU. Rendezvous honours torchrun's variables (MASTER_ADDR, MASTER_PORT,
RANK, WORLD_SIZE) where they are set; otherwise the engine picks a free local port.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llmctl.engine.step_batch import HEADER_LEN
from llmctl.errors import EngineDeadError
from llmctl.layers.tensor_parallel import TensorParallel

# Control commands, in the same header slot as step_batch's KIND_STEP / KIND_DENSE.
CMD_PROFILE = 3  # payload: max_num_batched_tokens, max_num_seqs
CMD_ALLOCATE = 4  # payload: num_blocks
CMD_CAPTURE = 5  # payload: max_model_len, max_num_tokens, max_num_seqs, max_prefill_graph_tokens
CMD_SHUTDOWN = 6
CMD_WORKSPACES = 8  # payload: max_num_tokens
CMD_MEMORY = 9  # every rank reports what it holds (Rank memory, gathered to rank 0)

JOIN_TIMEOUT_ENV = "LLMCTL_TP_JOIN_TIMEOUT"  # seconds a rank may take to load its shard and join


class TensorParallelError(EngineDeadError):
    """A tensor-parallel rank died, failed or never joined: the engine cannot go on."""


def join_timeout_s() -> float:
    return float(os.environ.get(JOIN_TIMEOUT_ENV, "600"))


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks meet: torchrun's variables, or a local port rank 0 picked."""

    addr: str
    port: int
    world_size: int
    external: bool  # launched by torchrun (or another launcher): no rank spawns another

    @classmethod
    def from_env(cls, tp_size: int) -> "Rendezvous | None":
        """torchrun's rendezvous when RANK and WORLD_SIZE are set, else None."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return None
        world = int(os.environ["WORLD_SIZE"])
        if world != tp_size:
            raise TensorParallelError(f"WORLD_SIZE={world} from the launcher, but tensor_parallel_size={tp_size}",
                                      hint="start one process per rank: torchrun --nproc-per-node N ... "
                                           "--tensor-parallel-size N")
        return cls(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500")),
                   world, external=True)

    @classmethod
    def local(cls, tp_size: int) -> "Rendezvous":
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return cls("127.0.0.1", port, tp_size, external=False)


def device_for_rank(device: torch.device, rank: int) -> torch.device:
    """CUDA: each rank its own GPU (LOCAL_RANK under torchrun, else the rank); CPU: the CPU."""
    if device.type != "cuda":
        return device
    local = int(os.environ.get("LOCAL_RANK", rank))
    if local >= torch.cuda.device_count():
        raise TensorParallelError(f"rank {rank} needs GPU {local}, but this machine has {torch.cuda.device_count()}",
                                  hint="lower --tensor-parallel-size to the number of GPUs")
    return torch.device("cuda", local)


def share_cpu_threads(tp_size: int) -> None:
    """On the CPU the ranks share its cores: each takes its part, not all of them (N ranks each
    running a thread per core would step on one another at every collective)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp_size))


def init_group(tp: TensorParallel, rendezvous: Rendezvous, device: torch.device, timeout_s: float) -> "StepChannel":
    """Join the process group (blocks until every rank has); bind the model's group to `tp`."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        dist.init_process_group(backend, init_method=f"tcp://{rendezvous.addr}:{rendezvous.port}",
                                rank=tp.rank, world_size=rendezvous.world_size, timeout=timeout)
    except Exception as err:  # the store times out when a rank never connects
        raise TensorParallelError(f"rank {tp.rank}: the {rendezvous.world_size} tensor-parallel ranks did not all "
                                  f"join at {rendezvous.addr}:{rendezvous.port} within {timeout_s:.0f} s ({err})",
                                  hint=f"a rank failed to start; raise {JOIN_TIMEOUT_ENV} for slow loads") from err
    tp.bind(dist.group.WORLD, backend)
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    return StepChannel(cpu_group, tp.rank)


class StepChannel:
    """Rank 0 broadcasts (header, payload) int64 arrays; every other rank receives them."""

    def __init__(self, group, rank: int) -> None:
        self.group = group
        self.rank = rank
        self._header = torch.zeros(HEADER_LEN + 1, dtype=torch.int64)  # header | payload length

    def send(self, header: list[int], payload: list[int]) -> None:
        self._header[:HEADER_LEN] = torch.tensor(header + [0] * (HEADER_LEN - len(header)), dtype=torch.int64)
        self._header[HEADER_LEN] = len(payload)
        dist.broadcast(self._header, src=0, group=self.group)
        if payload:
            dist.broadcast(torch.tensor(payload, dtype=torch.int64), src=0, group=self.group)

    def recv(self) -> tuple[list[int], list[int]]:
        dist.broadcast(self._header, src=0, group=self.group)
        header = self._header.tolist()
        n = header[HEADER_LEN]
        payload = torch.empty(n, dtype=torch.int64)
        if n:
            dist.broadcast(payload, src=0, group=self.group)
        return header[:HEADER_LEN], payload.tolist()

    def all_gather(self, values: list[int]) -> list[list[int]]:
        t = torch.tensor(values, dtype=torch.int64)
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, t, group=self.group)
        return [p.tolist() for p in parts]

    def all_reduce_max(self, values: list[int]) -> list[int]:
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t.tolist()


def destroy_group() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer is gone already; nothing left to tear down cleanly
            pass
