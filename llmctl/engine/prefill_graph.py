"""CUDA graphs for steps with prefill chunks: one captured forward (model, attention included, and
the logits of each sequence's last token) per (token-count, sequence-count) bucket.

Why. Eager, a step launches every kernel of every layer from Python: for a Llama-3-8B-shaped model
about 450 Triton and cuBLAS launches, 13 ms (fp16) to 28 ms (GPTQ, whose kernels take more
arguments) of host time on an H200 for a 16-token prompt whose kernels run 3-5 ms
(docs/benchmarks.md). At 1,024 tokens the GPTQ model's eager host time (~40 ms) still exceeds
its kernels' (~29 ms), so buckets go on in steps of 256 up to `max_graph_tokens` (ModelConfig.
max_prefill_graph_tokens, 2,048 by default: a few thousand tokens on, the GEMMs outlast the
launches and a graph buys nothing, while its memory pool grows with the bucket). Steps of more
tokens run eagerly.

How (vLLM captures prefill by token-count buckets too; here attention stays inside the graph):
- a step of T tokens from B sequences replays the graph of the smallest buckets >= T and >= B;
  tokens T.. are padding (slot -1: the cache write skips them; their rows are computed and
  dropped), sequences B.. have no tokens (query_start_loc repeats T: the attention kernel's
  programs for them exit at once);
- the prefill attention kernel reads query_start_loc, seq_lens and the block tables from device
  memory, so one capture serves every split of the T tokens among the B sequences; it is
  captured with max_query_len = the token bucket (the grid's upper bound);
- inputs travel as in the decode graphs (llmctl.engine.cuda_graph): written into two pinned host
  buffers laid out like the device buffers, two asynchronous copies, then the replay;
- prompt logprobs need every row's logits: such steps run eagerly.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from llmctl.engine.cuda_graph import reserved_after_release
from llmctl.engine.graph_buckets import DEFAULT_MAX_GRAPH_TOKENS, prefill_capture_sizes, smallest_holding
from llmctl.layers.attention import AttentionMetadata, attention_metadata

__all__ = ["PrefillGraphs", "prefill_capture_sizes", "stage_inputs"]


class PrefillGraphs:
    def __init__(self, model: nn.Module, device: torch.device, block_size: int, max_model_len: int,
                 max_num_tokens: int, max_num_seqs: int, max_graph_tokens: int = DEFAULT_MAX_GRAPH_TOKENS) -> None:
        self.model = model
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.device = device
        self.token_sizes, self.seq_sizes = prefill_capture_sizes(max_num_tokens, max_num_seqs, max_graph_tokens)
        self.max_tokens, self.max_seqs = self.token_sizes[-1], self.seq_sizes[-1]
        t, b = self.max_tokens, self.max_seqs
        self.max_blocks = -(-max_model_len // block_size)
        # longs = input_ids | positions | slot_mapping [t each] | last-token rows [b];
        # ints = query_start_loc [b + 1] | seq_lens [b] | the step's block tables, compact [B, width]
        # (the graphs read them from block_tables [b, max_blocks], one device copy)
        self._num_longs, self._num_ints = 3 * t + b, 2 * b + 1 + b * self.max_blocks
        self._longs = torch.zeros(self._num_longs, dtype=torch.long, device=device)
        self._ints = torch.zeros(self._num_ints, dtype=torch.int32, device=device)
        self._host_longs = torch.zeros(self._num_longs, dtype=torch.long, pin_memory=True)
        self._host_ints = torch.zeros(self._num_ints, dtype=torch.int32, pin_memory=True)
        self.input_ids, self.positions, self.slot_mapping = self._longs[:3 * t].view(3, t)
        self.last_rows = self._longs[3 * t:]
        self.query_start_loc = self._ints[:b + 1]
        self.seq_lens = self._ints[b + 1:2 * b + 1]
        self.block_tables = torch.zeros(b, self.max_blocks, dtype=torch.int32, device=device)
        self.slot_mapping.fill_(-1)
        self._staged = torch.cuda.Event()  # recorded once a step's copies have read the host buffers
        self._staged.record()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_seconds = 0.0
        self.pool_bytes = 0  # what the graphs' private memory pool took (reserved after - before capture)
        self.num_replays = 0

    def buckets(self, num_tokens: int, num_seqs: int) -> tuple[int, int] | None:
        t = smallest_holding(self.token_sizes, num_tokens)
        b = smallest_holding(self.seq_sizes, num_seqs)
        return None if t is None or b is None else (t, b)

    def _forward(self, t: int, b: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:t], block_tables=self.block_tables[:b],
            query_start_loc=self.query_start_loc[:b + 1], seq_lens=self.seq_lens[:b],
            max_query_len=t, max_seq_len=self.max_model_len, block_size=self.block_size,
        )
        with attention_metadata(meta):
            hidden = self.model(self.input_ids[:t], self.positions[:t])  # [t, D]
        return self.model.compute_logits(hidden.index_select(0, self.last_rows[:b]))  # [b, V] fp32

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up (compiles every kernel variant), then capture each bucket pair, largest first.
        The warm-up runs with every token padding and every sequence empty: it writes nothing."""
        start = time.perf_counter()
        reserved = reserved_after_release(self.device)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for t in reversed(self.token_sizes):
            for b in reversed(self.seq_sizes):
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        self._forward(t, b)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._forward(t, b)
                self.graphs[(t, b)] = (graph, logits)
        self.capture_seconds = time.perf_counter() - start
        self.pool_bytes = reserved_after_release(self.device) - reserved

    def run(self, token_ids: list[int], starts: list[int], lens: list[int], tables: list[list[int]]) -> torch.Tensor:
        """fp32 logits [B, V] of each sequence's last new token, by graph replay: sequence i adds
        lens[i] tokens at positions starts[i]..; token_ids are all new tokens, flat; tables the
        block tables padded to one width. Valid until the next replay."""
        num_tokens, num_seqs = len(token_ids), len(starts)
        t, b = self.buckets(num_tokens, num_seqs)
        graph, logits = self.graphs[(t, b)]
        self._staged.synchronize()  # the previous step's copies have read the host buffers
        used = stage_inputs(self._host_longs.numpy(), self._host_ints.numpy(), self.max_tokens, self.max_seqs, t, b,
                            self.block_size, token_ids, starts, lens, tables)
        self._longs.copy_(self._host_longs, non_blocking=True)
        self._ints[:used].copy_(self._host_ints[:used], non_blocking=True)
        self._staged.record()
        width = len(tables[0])
        start = 2 * self.max_seqs + 1
        self.block_tables[:num_seqs, :width].copy_(self._ints[start:used].view(num_seqs, width))
        graph.replay()
        self.num_replays += 1
        return logits[:num_seqs]


def stage_inputs(longs: np.ndarray, ints: np.ndarray, tmax: int, bmax: int, t: int, b: int, block_size: int,
                 token_ids: list[int], starts: list[int], lens: list[int], tables: list[list[int]]) -> int:
    """Write one step's inputs into the host buffers (laid out as `PrefillGraphs` says) for the
    buckets (t, b); returns how many ints are used."""
    num_tokens, num_seqs = len(token_ids), len(starts)
    lens_np = np.asarray(lens, dtype=np.int64)
    ends = np.cumsum(lens_np)
    seq_idx = np.repeat(np.arange(num_seqs), lens_np)
    positions = np.asarray(starts, dtype=np.int64)[seq_idx] + np.arange(num_tokens) - (ends - lens_np)[seq_idx]
    table_np = np.asarray(tables, dtype=np.int64)  # [B, width]
    longs[:num_tokens] = token_ids
    longs[tmax:tmax + num_tokens] = positions
    slots = table_np[seq_idx, positions // block_size] * block_size + positions % block_size
    longs[2 * tmax:2 * tmax + num_tokens] = slots
    longs[2 * tmax + num_tokens:2 * tmax + t] = -1  # padding tokens write no cache slot
    longs[3 * tmax:3 * tmax + num_seqs] = ends - 1  # each sequence's last new token
    longs[3 * tmax + num_seqs:3 * tmax + b] = 0  # padding sequences: any row below t
    ints[0] = 0
    ints[1:num_seqs + 1] = ends
    ints[num_seqs + 1:b + 1] = num_tokens  # padding sequences: no tokens
    ints[bmax + 1:bmax + 1 + num_seqs] = np.asarray(starts) + lens_np
    ints[bmax + 1 + num_seqs:bmax + 1 + b] = 1
    ints[2 * bmax + 1:2 * bmax + 1 + table_np.size] = table_np.reshape(-1)
    return 2 * bmax + 1 + table_np.size
