"""Which shard of the model this process holds, and the two collectives the sharded layers
need: the all-reduce after a row-parallel product and the gather of vocabulary shards.

One `TensorParallel` object is made per process at engine start and handed to every layer;
at size 1 no layer calls into torch.distributed. The process group is bound after the
weights are loaded (a rank loads its shard before every rank has joined).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmctl.config import kv_heads_per_rank, vocab_rows_per_rank

if TYPE_CHECKING:
    import torch

__all__ = ["TensorParallel", "kv_heads_per_rank", "vocab_rows_per_rank"]



class TensorParallel:
    """Rank `rank` of `size`; `group` is the torch.distributed group of the model's tensors
    (NCCL on CUDA, gloo on the CPU), None until `bind`."""

    def __init__(self, rank: int = 0, size: int = 1) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is outside 0..{size - 1}")
        self.rank = rank
        self.size = size
        self.group: Any = None
        self.backend = "gloo"

    def __repr__(self) -> str:
        return f"TensorParallel(rank={self.rank}, size={self.size})"

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def bind(self, group: Any, backend: str) -> None:
        self.group = group
        self.backend = backend

    def shard(self, total: int) -> tuple[int, int]:
        """(first index, count) of this rank's piece of `total`, padded to equal pieces: the
        last rank's piece may run past `total` (its tail is padding)."""
        per_rank = vocab_rows_per_rank(total, self.size)
        return self.rank * per_rank, per_rank

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        # x: any shape, summed in place across ranks
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [R, n] on every rank -> [R, size * n] in rank order on rank 0 (None elsewhere
        under gloo; NCCL gathers everywhere, which a CUDA graph can capture)."""
        import torch
        import torch.distributed as dist

        x = x.contiguous()
        if self.backend == "nccl":
            out = torch.empty((self.size, *x.shape), dtype=x.dtype, device=x.device)
            dist.all_gather_into_tensor(out, x, group=self.group)
        else:
            parts = [torch.empty_like(x) for _ in range(self.size)] if self.is_first else None
            dist.gather(x, parts, dst=dist.get_global_rank(self.group, 0), group=self.group)
            if parts is None:
                return None
            out = torch.stack(parts)
        return out.permute(1, 0, 2).reshape(x.shape[0], -1)  # [R, size * n]
