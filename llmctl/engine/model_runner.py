"""`ModelRunner`: owns this rank's KV cache tensors and turns one `StepBatch` (plain arrays,
llmctl.engine.step_batch) into a forward pass, logits at the rows it names, and sampled tokens.

Per step it builds, from the batch's arrays (decodes first, then prefill chunks):

    input_ids      [T]   the new tokens, flattened in batch order
    positions      [T]   start_pos .. start_pos + num_new_tokens - 1 per sequence
    slot_mapping   [T]   block_tables[seq, pos // bs] * bs + pos % bs   (computed with torch)
    block_tables   [B, max_blocks], query_start_loc [B + 1], seq_lens [B]

Positions and slots are derived on the device from the starts and lengths, so per-step host
work grows with B, not with T. A decode-only step (one token per sequence, T = B) computes
them on the host instead, one lookup per sequence, and sends everything in two copies; one that
replays a CUDA graph writes them straight into the graph's pinned staging buffers. The cache
is one tensor [2, L, num_blocks, block_size, Hkv, Dh] (Hkv: this rank's KV heads); layer i
reads the contiguous views [0, i] and [1, i].

On CUDA, a decode-only step writes its inputs into the persistent buffers of a captured graph
of the forward and the logits and replays it (llmctl.engine.cuda_graph), and so does a step with
prefill chunks of up to 2,048 tokens (max_prefill_graph_tokens) from up to 8 sequences
(llmctl.engine.prefill_graph), unless the engine runs with enforce_eager.

Under tensor parallelism every rank runs one of these on its shard. Rank 0's runner holds a
`StepChannel`: each call that runs the model (a step, the memory
profile, the cache allocation, the graph capture) first broadcasts what to run, and the other
ranks' worker loops (llmctl.engine.worker) make the same call. Logits reach rank 0 only; it
alone samples. At tensor_parallel_size 1 there is no channel and no collective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from llmctl.engine.outputs import Logprobs
from llmctl.engine.scoring import add_scores
from llmctl.engine.step_batch import StepBatch, to_wire
from llmctl.layers.attention import Attention, AttentionMetadata, attention_metadata
from llmctl.layers.sampler import Sampler, SamplingMetadata, compute_prompt_logprobs
from llmctl.models.arch import ModelArch
from llmctl.sampling_params import SamplingParams

_PROMPT_LOGITS_ROWS = 512  # logits rows per compute_logits call: bounds the fp32 [rows, V] peak


@dataclass
class ModelRunnerOutput:
    """Aligned with the step's scheduled entries."""

    sampled_token_ids: list[int | None]  # None where the entry does not sample
    logprobs: list[Logprobs | None]  # top-k dicts where the sequence asked for logprobs
    prompt_logprobs: dict[int, list[Logprobs | None]]  # seq_id -> entries for this chunk's positions
    # seq_id -> (the scorer's results for this step's rows, the next prompt token to score)
    prompt_scores: dict[int, tuple[list, int]] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, model: nn.Module, arch: ModelArch, device: torch.device, dtype: torch.dtype,
                 block_size: int, eos_token_id: int | tuple[int, ...] | None, channel=None) -> None:
        self.model = model
        self.arch = arch
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.eos_token_id = eos_token_id  # every EOS id: min_tokens holds them all back
        self.vocab_size = arch.vocab_size
        self.channel = channel  # rank 0 of a tensor-parallel engine: a StepChannel to the other ranks
        self.sampler = Sampler()
        self.attn_layers = [m for m in model.modules() if isinstance(m, Attention)]
        if len(self.attn_layers) != arch.num_hidden_layers:
            raise RuntimeError(f"model has {len(self.attn_layers)} attention layers, config says "
                               f"{arch.num_hidden_layers}")
        self.kv_cache: torch.Tensor | None = None
        self._pin = device.type == "cuda"
        self.decode_graphs = None  # DecodeGraphs once captured
        self.prefill_graphs = None  # PrefillGraphs once captured

    def _announce(self, header: list[int], payload: list[int] | None = None) -> None:
        if self.channel is not None:
            self.channel.send(header, payload or [])

    def capture_graphs(self, max_model_len: int, max_num_tokens: int, max_num_seqs: int,
                       max_prefill_graph_tokens: int) -> None:
        """Capture the decode graphs (batch buckets up to max_num_seqs) and the prefill graphs
        (token and sequence buckets of a step's budget, up to max_prefill_graph_tokens tokens;
        0: none); CUDA, after the KV cache is allocated. Each object's capture_seconds says how
        long it took, the prefill graphs' pool_bytes the memory their pool keeps."""
        from llmctl.engine.cuda_graph import DecodeGraphs
        from llmctl.engine.distributed import CMD_CAPTURE
        from llmctl.engine.prefill_graph import PrefillGraphs

        self._announce([CMD_CAPTURE], [max_model_len, max_num_tokens, max_num_seqs, max_prefill_graph_tokens])
        self.decode_graphs = DecodeGraphs(self.model, self.device, self.block_size, max_model_len, max_num_seqs)
        self.decode_graphs.capture()
        if max_prefill_graph_tokens > 0:
            self.prefill_graphs = PrefillGraphs(self.model, self.device, self.block_size, max_model_len,
                                                max_num_tokens, max_num_seqs, max_prefill_graph_tokens)
            self.prefill_graphs.capture()

    def allocate_workspaces(self, max_num_tokens: int) -> int:
        """Let each linear method allocate the buffers its kernels share (the GPTQ kernels'
        split-K scratch), before the engine measures its memory; returns their bytes."""
        from llmctl.engine.distributed import CMD_WORKSPACES

        self._announce([CMD_WORKSPACES], [max_num_tokens])
        methods = {id(m.linear_method): m.linear_method for m in self.model.modules() if hasattr(m, "linear_method")}
        return sum(method.allocate_workspace(max_num_tokens, self.device) for method in methods.values())

    @torch.inference_mode()
    def warm_up_sampler(self) -> None:
        """Compile the sampling kernel (CUDA) now, not at the first request that samples at random."""
        params = SamplingParams(temperature=0.8, top_p=0.9, top_k=5, min_p=0.01)
        metadata = SamplingMetadata.build([(params, [], [], None)], self.vocab_size, self.eos_token_id, self.device)
        self.sampler(torch.zeros(1, self.vocab_size, device=self.device), metadata).sampled_token_ids.tolist()

    def _replays(self, batch: StepBatch) -> bool:
        graphs = self.decode_graphs
        return (graphs is not None and batch.decode_only and batch.num_seqs <= graphs.max_batch
                and len(batch.block_tables[0]) <= graphs.block_tables.shape[1])

    def _replays_prefill(self, batch: StepBatch) -> bool:
        graphs = self.prefill_graphs
        return (graphs is not None and not batch.has_prompt_logprobs
                and graphs.buckets(len(batch.input_ids), batch.num_seqs) is not None)

    # ---- KV cache --------------------------------------------------------------
    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Zeroed, so a masked-out slot can never feed NaN into attention."""
        from llmctl.engine.distributed import CMD_ALLOCATE

        self._announce([CMD_ALLOCATE], [num_blocks])
        layer = self.attn_layers[0]
        shape = (2, self.arch.num_hidden_layers, num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.attn_layers):
            layer.k_cache = self.kv_cache[0, i]
            layer.v_cache = self.kv_cache[1, i]

    def memory_report(self) -> list[int]:
        """[weight bytes, KV cache bytes, CUDA bytes allocated now, CUDA peak] of this rank."""
        from llmctl.layers.quantization import held_weight_bytes

        params = held_weight_bytes(self.model)
        kv = self.kv_cache.numel() * self.kv_cache.element_size() if self.kv_cache is not None else 0
        cuda = self.device.type == "cuda"
        return [params, kv, torch.cuda.memory_allocated(self.device) if cuda else 0,
                torch.cuda.max_memory_allocated(self.device) if cuda else 0]

    def memory_per_rank(self) -> list[dict[str, int]]:
        """`memory_report` of every rank, in rank order (what `llmctl plan` predicts per rank)."""
        from llmctl.engine.distributed import CMD_MEMORY

        reports = [self.memory_report()]
        if self.channel is not None:
            self._announce([CMD_MEMORY])
            reports = self.channel.all_gather(reports[0])
        keys = ("weight_bytes", "kv_cache_bytes", "cuda_allocated_bytes", "cuda_peak_bytes")
        return [dict(zip(keys, r)) for r in reports]

    def copy_blocks(self, blocks_to_copy: list[tuple[int, int]]) -> None:
        """Copy-on-write: every layer's K and V of each src block into its dst block."""
        if not blocks_to_copy:
            return
        src, dst = zip(*blocks_to_copy)
        src_t = torch.tensor(src, dtype=torch.long, device=self.device)
        dst_t = torch.tensor(dst, dtype=torch.long, device=self.device)
        self.kv_cache[:, :, dst_t] = self.kv_cache[:, :, src_t]

    @torch.inference_mode()
    def profile_activation_bytes(self, num_tokens: int, num_seqs: int) -> int:
        """Peak memory of one dense forward of `num_tokens` tokens plus logits and sampling
        for `num_seqs` rows (or a chunk of prompt-logprob rows, if more), over what is allocated
        now (CUDA only)."""
        from llmctl.engine.distributed import CMD_PROFILE

        self._announce([CMD_PROFILE], [num_tokens, num_seqs])
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        ids = torch.randint(0, self.vocab_size, (1, num_tokens), device=self.device)
        # Positions wrap at the model's context: a step's token budget may exceed it.
        positions = (torch.arange(num_tokens, device=self.device) % self.arch.max_position_embeddings)[None]
        hidden = self.model(ids, positions)  # no metadata: dense causal attention
        rows = hidden.reshape(-1, hidden.shape[-1])[:max(num_seqs, _PROMPT_LOGITS_ROWS)]
        logits = self.model.compute_logits(rows)
        if logits is not None:
            torch.softmax(logits, dim=-1).argmax(dim=-1)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del hidden, rows, logits
        torch.cuda.empty_cache()
        return peak

    # ---- one step --------------------------------------------------------------
    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype)
        if self._pin:
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _decode_slots(self, starts: list[int], padded: list[list[int]]) -> list[int]:
        """The cache slot of each sequence's one new token (decode-only steps), looked up on the host."""
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for table, p in zip(padded, starts)]

    def prepare_inputs(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """input_ids [T], positions [T] and the step's AttentionMetadata."""
        bs = self.block_size
        token_ids, starts, lens = batch.input_ids, batch.start_pos, batch.num_new_tokens
        num_seqs = batch.num_seqs
        if len(token_ids) == num_seqs:
            return self._prepare_decode(token_ids, starts, batch.block_tables)
        host = self._tensor([starts, lens], torch.int32)  # [2, B]
        block_tables = self._tensor(batch.block_tables, torch.int32)
        input_ids = self._tensor(token_ids, torch.long)
        start_pos, query_lens = host[0], host[1]
        query_start_loc = torch.zeros(num_seqs + 1, dtype=torch.int32, device=self.device)
        torch.cumsum(query_lens, 0, out=query_start_loc[1:])
        num_tokens = len(token_ids)
        seq_idx = torch.repeat_interleave(torch.arange(num_seqs, device=self.device), query_lens,
                                          output_size=num_tokens)
        positions = ((start_pos.long() - query_start_loc[:-1].long())[seq_idx]
                     + torch.arange(num_tokens, device=self.device))
        slot_mapping = block_tables[seq_idx, positions // bs].long() * bs + positions % bs
        meta = AttentionMetadata(
            slot_mapping=slot_mapping, block_tables=block_tables, query_start_loc=query_start_loc,
            seq_lens=start_pos + query_lens, max_query_len=max(lens),
            max_seq_len=max(s + n for s, n in zip(starts, lens)), block_size=bs,
        )
        return input_ids, positions, meta

    def _prepare_decode(self, token_ids: list[int], starts: list[int],
                        padded: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """One new token per sequence: positions and slots are one lookup each on the host,
        so the step's inputs are two host-to-device copies and no device arithmetic."""
        num_seqs = len(starts)
        longs = self._tensor([token_ids, starts, self._decode_slots(starts, padded)], torch.long)  # [3, B]
        # int32, flat: query_start_loc [B + 1] | seq_lens [B] | block tables [B * max_blocks]
        ints = self._tensor([*range(num_seqs + 1), *(p + 1 for p in starts), *(b for row in padded for b in row)],
                            torch.int32)
        meta = AttentionMetadata(
            slot_mapping=longs[2], block_tables=ints[2 * num_seqs + 1:].view(num_seqs, -1),
            query_start_loc=ints[:num_seqs + 1], seq_lens=ints[num_seqs + 1:2 * num_seqs + 1],
            max_query_len=1, max_seq_len=max(starts) + 1, block_size=self.block_size,
        )
        return longs[0], longs[1], meta

    @torch.inference_mode()
    def run_model(self, batch: StepBatch) -> Iterator[tuple[int, torch.Tensor | None]]:
        """The forward of one batch, then fp32 logits of `batch.logits_rows` as (first row,
        logits [rows, V]) chunks; on ranks other than 0 the logits are None. Every rank runs
        the same calls in the same order (each is a collective under tensor parallelism)."""
        if self.channel is not None:
            self.channel.send(*to_wire(batch))
        if self._replays(batch):
            # Decode only: every row samples; the inputs go straight into the graph's buffers.
            starts, tables = batch.start_pos, batch.block_tables
            yield 0, self.decode_graphs.run(batch.input_ids, starts, self._decode_slots(starts, tables), tables)
            return
        if self._replays_prefill(batch):
            # Prefill chunks (with or without decodes) from a captured graph: logits of every
            # sequence's last new token, of which the sampling rows are kept.
            self.copy_blocks(batch.blocks_to_copy)
            logits = self.prefill_graphs.run(batch.input_ids, batch.start_pos, batch.num_new_tokens,
                                             batch.block_tables)  # [B, V] fp32
            rows = batch.sample_entries  # rank 0's; the other ranks drop their logits
            if rows and logits is not None:
                yield 0, logits if len(rows) == batch.num_seqs else logits[torch.tensor(rows, device=self.device)]
            return
        self.copy_blocks(batch.blocks_to_copy)
        input_ids, positions, meta = self.prepare_inputs(batch)
        with attention_metadata(meta):
            hidden = self.model(input_ids, positions)  # [T, D]
        rows = batch.logits_rows
        if not rows:
            return
        index = torch.tensor(rows, device=self.device)
        chunk = max(_PROMPT_LOGITS_ROWS, batch.num_sample_rows)  # the sampling rows come in one chunk
        for lo in range(0, len(rows), chunk):
            yield lo, self.model.compute_logits(hidden[index[lo:lo + chunk]])

    def execute(self, batch: StepBatch) -> ModelRunnerOutput:
        """Run one step (rank 0): the forward, prompt logprobs and one sampled token per sampling row."""
        num_entries = batch.num_seqs
        sampled: list[int | None] = [None] * num_entries
        logprobs: list[Logprobs | None] = [None] * num_entries
        prompt_logprobs: dict[int, list[Logprobs | None]] = {span.seq_id: [] for span in batch.prompt_spans}
        prompt_scores: dict[int, tuple[list, int]] = {}
        sample_logits = None
        for first, logits in self.run_model(batch):
            if first == 0 and batch.num_sample_rows:
                sample_logits = logits[:batch.num_sample_rows]
            self._add_prompt_logprobs(batch, first, logits, prompt_logprobs)
            add_scores(batch.score_spans, first, logits, prompt_scores)
        if sample_logits is not None:
            metadata = SamplingMetadata.build(batch.sampling, self.vocab_size, self.eos_token_id, self.device)
            result = self.sampler(sample_logits, metadata)
            for row, token_id in zip(batch.sample_entries, result.sampled_token_ids.tolist()):
                sampled[row] = token_id
            if result.logprobs is not None:
                for row, entry in zip(batch.sample_entries, result.logprobs.tolists(metadata.num_logprobs)):
                    logprobs[row] = entry
        return ModelRunnerOutput(sampled, logprobs, prompt_logprobs, prompt_scores)

    @staticmethod
    def _add_prompt_logprobs(batch: StepBatch, first: int, logits: torch.Tensor,
                             result: dict[int, list[Logprobs | None]]) -> None:
        """Prompt logprobs of the spans' rows inside logits_rows[first:first + len(logits)]."""
        last = first + logits.shape[0]
        for span in batch.prompt_spans:
            if span.num_rows == 0:  # a one-token prompt: its only entry is position 0's None
                if first == 0:
                    result[span.seq_id].append(None)
                continue
            lo, hi = max(first, span.first_row), min(last, span.first_row + span.num_rows)
            if lo >= hi:
                continue
            start = span.lo + lo - span.first_row
            result[span.seq_id] += compute_prompt_logprobs(logits[lo - first:hi - first], span.prompt_token_ids,
                                                           span.num_logprobs, start=start)
