"""Token embedding and the LM head (one weight [V, D]; the head may share the embedding's),
split along the vocabulary under tensor parallelism.

Rank r holds rows r*Vr .. (r+1)*Vr - 1 with Vr = ceil(V / tp); rows past V are zero padding.
The embedding looks up the ids in its range, zeroes the others and all-reduces (exactly one
rank contributes each row); the head computes its Vr logits and they are gathered to rank 0,
which drops the padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.layers.linear import as_tensor, set_weight_attrs
from llmctl.layers.tensor_parallel import TensorParallel


class VocabParallelEmbedding(nn.Module):
    """Token ids -> vectors."""

    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype: torch.dtype | None = None,
                 tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.tp = tp or TensorParallel()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.vocab_start, self.num_embeddings_per_partition = self.tp.shard(num_embeddings)
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim, dtype=params_dtype),
                                   requires_grad=False)
        set_weight_attrs(self.weight, {"output_dim": 0, "input_dim": 1, "weight_loader": self.weight_loader})

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [...] -> [..., D]
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings_per_partition)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int | str | None = None) -> None:
        from llmctl.errors import ModelLoadError

        if tuple(loaded_weight.shape) != (self.num_embeddings, self.embedding_dim):
            raise ModelLoadError(f"weight: shape {tuple(loaded_weight.shape)} does not match the expected "
                                 f"{(self.num_embeddings, self.embedding_dim)}")
        rows = max(0, min(self.num_embeddings - self.vocab_start, self.num_embeddings_per_partition))
        param.data[rows:].zero_()
        param.data[:rows].copy_(as_tensor(loaded_weight.narrow(0, self.vocab_start, rows)))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows {self.vocab_start}+{self.num_embeddings_per_partition}"


class ParallelLMHead(VocabParallelEmbedding):
    """Hidden states -> vocab logits, with its own weight or the embedding's (tied)."""

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [..., D] -> [..., V] (at tp > 1: [R, D] -> [R, V] on rank 0, on the others
        # [R, V] under NCCL and None under gloo)
        logits = F.linear(hidden, self.weight)
        if self.tp.size == 1:
            return logits
        gathered = self.tp.gather_last_dim(logits)
        return None if gathered is None else gathered[:, :self.num_embeddings]
