"""CUDA graphs for decode steps: one captured forward (model + logits) per batch-size bucket.

A decode step of a large model launches hundreds of small kernels; eager, the host's launch
time exceeds the GPU's work at small batches, so the weights' bytes no longer decide the
step time. Replaying a captured graph costs one launch. As in vLLM:

- only decode-only steps replay (every scheduled sequence adds one token and samples);
  prefill chunks, and batches above the largest bucket, run eagerly;
- a batch of B sequences replays the graph of the smallest bucket >= B; rows B.. are padding:
  slot -1 (the cache write skips them), context length 1, block table row left as it was
  (valid block ids, read and discarded);
- every input lives in a persistent buffer the graph was captured on; a step writes its inputs
  into two pinned host buffers laid out like those, copies each in one asynchronous copy (and
  the block tables, sent compact, into their rows with one device copy), replays, and reads
  logits[:B];
- attention is captured with max_seq_len = max_model_len, so the decode kernel's split of
  the context is fixed; slices past a sequence's length exit at once.

Graphs share one memory pool, captured largest first. Sampling stays outside the graph.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from llmctl.engine.graph_buckets import capture_sizes, smallest_holding
from llmctl.layers.attention import AttentionMetadata, attention_metadata

__all__ = ["DecodeGraphs", "capture_sizes", "reserved_after_release"]


def reserved_after_release(device: torch.device) -> int:
    """CUDA memory reserved once the allocator's free cached blocks are released: before and
    after a capture, the difference is what the graphs' private pool keeps (the warm-ups'
    eager activations come and go in the general pool)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved(device)


class DecodeGraphs:
    def __init__(self, model: nn.Module, device: torch.device, block_size: int, max_model_len: int,
                 max_num_seqs: int) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(max_num_seqs)
        self.max_batch = self.sizes[-1]
        n, max_blocks = self.max_batch, -(-max_model_len // block_size)
        # Device buffers the graphs read, and pinned host buffers laid out alike: longs =
        # input_ids | positions | slot_mapping, ints = seq_lens | the step's block tables, compact
        # [B, width] (the graphs read them from block_tables [n, max_blocks], one device copy).
        self._longs = torch.zeros(3 * n, dtype=torch.long, device=device)
        self._ints = torch.ones(n + n * max_blocks, dtype=torch.int32, device=device)
        self._host_longs = torch.zeros(3 * n, dtype=torch.long, pin_memory=True)
        self._host_ints = torch.ones(n + n * max_blocks, dtype=torch.int32, pin_memory=True)
        self.input_ids, self.positions, self.slot_mapping = self._longs.view(3, n)
        self.slot_mapping.fill_(-1)
        self._host_longs.view(3, n)[2].fill_(-1)
        self.seq_lens = self._ints[:n]
        with torch.device(device):
            self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32)
            self.query_start_loc = torch.arange(n + 1, dtype=torch.int32)
        self._staged = torch.cuda.Event()  # recorded once a step's copies have read the host buffers
        self._staged.record()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_seconds = 0.0
        self.pool_bytes = 0  # what the graphs' private memory pool keeps
        self.num_replays = 0

    def bucket(self, batch: int) -> int | None:
        return smallest_holding(self.sizes, batch)

    def _forward(self, b: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], block_tables=self.block_tables[:b],
            query_start_loc=self.query_start_loc[:b + 1], seq_lens=self.seq_lens[:b],
            max_query_len=1, max_seq_len=self.max_model_len, block_size=self.block_size,
        )
        with attention_metadata(meta):
            hidden = self.model(self.input_ids[:b], self.positions[:b])
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up (compiles every kernel variant), then capture each bucket, largest first."""
        start = time.perf_counter()
        reserved = reserved_after_release(self.device)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for b in reversed(self.sizes):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._forward(b)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(b)
            self.graphs[b] = (graph, logits)
        self.capture_seconds = time.perf_counter() - start
        self.pool_bytes = reserved_after_release(self.device) - reserved  # the logits of every bucket, mostly

    def run(self, token_ids: list[int], starts: list[int], slots: list[int],
            tables: list[list[int]]) -> torch.Tensor:
        """fp32 logits [B, V] of one decode-only step (B <= max_batch) by graph replay: sequence i
        adds token token_ids[i] at position starts[i] into cache slot slots[i]; tables are its
        block tables, padded to one width. The returned tensor is the graph's output buffer:
        valid until the next replay."""
        batch = len(token_ids)
        b = self.bucket(batch)
        graph, logits = self.graphs[b]
        n, width = self.max_batch, len(tables[0])
        self._staged.synchronize()  # the previous step's copies have read the host buffers
        longs = self._host_longs.numpy().reshape(3, n)
        longs[0, :batch] = token_ids
        longs[1, :batch] = starts
        longs[2, :batch] = slots
        longs[2, batch:b] = -1  # padding rows write no cache slot
        ints = self._host_ints.numpy()
        ints[:batch] = starts
        ints[:batch] += 1
        ints[batch:b] = 1
        ints[n:n + batch * width] = [block for row in tables for block in row]
        self._longs.copy_(self._host_longs, non_blocking=True)
        self._ints[:n + batch * width].copy_(self._host_ints[:n + batch * width], non_blocking=True)
        self._staged.record()
        self.block_tables[:batch, :width].copy_(self._ints[n:n + batch * width].view(batch, width))
        graph.replay()
        self.num_replays += 1
        return logits[:batch]
