"""Token embedding and the LM head (one weight [V, D]; the head may share the embedding's)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.layers.linear import copy_checked, set_weight_attrs


class VocabParallelEmbedding(nn.Module):
    """Token ids -> vectors. Not sharded yet; the vocab dim (0) is where it would split."""

    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, dtype=params_dtype), requires_grad=False)
        set_weight_attrs(self.weight, {"output_dim": 0, "input_dim": 1, "weight_loader": self.weight_loader})

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [...] -> [..., D]
        return F.embedding(input_ids, self.weight)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int | str | None = None) -> None:
        copy_checked(param.data, loaded_weight, "weight")

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class ParallelLMHead(VocabParallelEmbedding):
    """Hidden states -> vocab logits, with its own weight or the embedding's (tied)."""

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [..., D] -> [..., V]
        return F.linear(hidden, self.weight)
