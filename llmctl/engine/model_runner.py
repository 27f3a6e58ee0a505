"""`ModelRunner`: owns the KV cache tensors and turns one `SchedulerOutput` into a forward
pass, logits at the sampling positions only, and sampled tokens.

Per step it builds, from the scheduled sequences (decodes first, then prefill chunks):

    input_ids      [T]   the new tokens, flattened in batch order
    positions      [T]   start_pos .. start_pos + num_new_tokens - 1 per sequence
    slot_mapping   [T]   block_tables[seq, pos // bs] * bs + pos % bs   (computed with torch)
    block_tables   [B, max_blocks], query_start_loc [B + 1], seq_lens [B]

Only the token ids and block tables are gathered in Python (one list per sequence);
positions and slots are derived on the device from those, so per-step host work grows
with B, not with T. A decode-only step (one token per sequence, T = B) computes them on
the host instead, one lookup per sequence, and sends everything in two copies; one that
replays a CUDA graph writes them straight into the graph's pinned staging buffers. The cache
is one tensor [2, L, num_blocks, block_size, Hkv, Dh]; layer i reads the contiguous views
[0, i] and [1, i].

Every step input is a tensor built from a handful of host lists. On CUDA, a decode-only
step writes them into the persistent buffers of a captured graph of the forward and the
logits and replays it (llmctl.engine.cuda_graph), and so does a step with prefill chunks of
up to 512 tokens from up to 8 sequences (llmctl.engine.prefill_graph), unless the engine runs
with enforce_eager.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from llmctl.engine.outputs import Logprobs
from llmctl.engine.scheduler import SchedulerOutput
from llmctl.layers.attention import Attention, AttentionMetadata, attention_metadata
from llmctl.layers.sampler import Sampler, SamplingMetadata, compute_prompt_logprobs
from llmctl.models.arch import ModelArch
from llmctl.sampling_params import SamplingParams

_PROMPT_LOGITS_ROWS = 512  # prompt-logprob rows per compute_logits call: bounds the fp32 [rows, V] peak


@dataclass
class ModelRunnerOutput:
    """Aligned with `SchedulerOutput.scheduled`."""

    sampled_token_ids: list[int | None]  # None where the entry does not sample
    logprobs: list[Logprobs | None]  # top-k dicts where the sequence asked for logprobs
    prompt_logprobs: dict[int, list[Logprobs | None]]  # seq_id -> entries for this chunk's positions


class ModelRunner:
    def __init__(self, model: nn.Module, arch: ModelArch, device: torch.device, dtype: torch.dtype,
                 block_size: int, eos_token_id: int | tuple[int, ...] | None) -> None:
        self.model = model
        self.arch = arch
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.eos_token_id = eos_token_id  # every EOS id: min_tokens holds them all back
        self.vocab_size = arch.vocab_size
        self.sampler = Sampler()
        self.attn_layers = [m for m in model.modules() if isinstance(m, Attention)]
        if len(self.attn_layers) != arch.num_hidden_layers:
            raise RuntimeError(f"model has {len(self.attn_layers)} attention layers, config says "
                               f"{arch.num_hidden_layers}")
        self.kv_cache: torch.Tensor | None = None
        self._pin = device.type == "cuda"
        self.decode_graphs = None  # DecodeGraphs once captured
        self.prefill_graphs = None  # PrefillGraphs once captured

    def capture_graphs(self, max_model_len: int, max_num_tokens: int, max_num_seqs: int) -> None:
        """Capture the decode graphs (batch buckets up to max_num_seqs) and the prefill graphs
        (token and sequence buckets of a step's budget); CUDA, after the KV cache is allocated.
        Each object's capture_seconds says how long it took."""
        from llmctl.engine.cuda_graph import DecodeGraphs
        from llmctl.engine.prefill_graph import PrefillGraphs

        self.decode_graphs = DecodeGraphs(self.model, self.device, self.block_size, max_model_len, max_num_seqs)
        self.decode_graphs.capture()
        self.prefill_graphs = PrefillGraphs(self.model, self.device, self.block_size, max_model_len, max_num_tokens,
                                            max_num_seqs)
        self.prefill_graphs.capture()

    def allocate_workspaces(self, max_num_tokens: int) -> int:
        """Let each linear method allocate the buffers its kernels share (the GPTQ kernels'
        split-K scratch), before the engine measures its memory; returns their bytes."""
        methods = {id(m.linear_method): m.linear_method for m in self.model.modules() if hasattr(m, "linear_method")}
        return sum(method.allocate_workspace(max_num_tokens, self.device) for method in methods.values())

    @torch.inference_mode()
    def warm_up_sampler(self) -> None:
        """Compile the sampling kernel (CUDA) now, not at the first request that samples at random."""
        params = SamplingParams(temperature=0.8, top_p=0.9, top_k=5, min_p=0.01)
        metadata = SamplingMetadata.build([(params, [], [], None)], self.vocab_size, self.eos_token_id, self.device)
        self.sampler(torch.zeros(1, self.vocab_size, device=self.device), metadata).sampled_token_ids.tolist()

    def _replays(self, out: SchedulerOutput) -> bool:
        graphs = self.decode_graphs
        return (graphs is not None and len(out.scheduled) <= graphs.max_batch
                and all(e.num_new_tokens == 1 and e.do_sample and e.start_pos >= e.seq.num_prompt_tokens
                        and len(e.seq.block_table) <= graphs.block_tables.shape[1] for e in out.scheduled))

    def _replays_prefill(self, out: SchedulerOutput, prompt_logprobs_from: Mapping[int, int]) -> bool:
        graphs = self.prefill_graphs
        return (graphs is not None and graphs.buckets(sum(e.num_new_tokens for e in out.scheduled),
                                                      len(out.scheduled)) is not None
                and not any(e.seq.seq_id in prompt_logprobs_from for e in out.scheduled))

    # ---- KV cache --------------------------------------------------------------
    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Zeroed, so a masked-out slot can never feed NaN into attention."""
        shape = (2, self.arch.num_hidden_layers, num_blocks, self.block_size,
                 self.arch.num_key_value_heads, self.arch.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.attn_layers):
            layer.k_cache = self.kv_cache[0, i]
            layer.v_cache = self.kv_cache[1, i]

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
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        ids = torch.randint(0, self.vocab_size, (1, num_tokens), device=self.device)
        # Positions wrap at the model's context: a step's token budget may exceed it.
        positions = (torch.arange(num_tokens, device=self.device) % self.arch.max_position_embeddings)[None]
        hidden = self.model(ids, positions)  # no metadata: dense causal attention
        rows = hidden.reshape(-1, hidden.shape[-1])[:max(num_seqs, _PROMPT_LOGITS_ROWS)]
        logits = self.model.compute_logits(rows)
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

    @staticmethod
    def _host_lists(entries) -> tuple[list[int], list[int], list[int], list[list[int]]]:
        """The step's token ids (flat), start positions, new-token counts and block tables padded
        with block 0 to the longest (entries past a sequence's blocks are never read)."""
        token_ids: list[int] = []
        starts, lens, tables = [], [], []
        for e in entries:
            seq = e.seq
            if e.num_new_tokens == 1:
                token_ids.append(seq.token_ids[e.start_pos])
            else:
                token_ids.extend(seq.token_ids[e.start_pos:e.start_pos + e.num_new_tokens])
            starts.append(e.start_pos)
            lens.append(e.num_new_tokens)
            tables.append(seq.block_table)
        max_blocks = max(len(t) for t in tables)
        return token_ids, starts, lens, [t + [0] * (max_blocks - len(t)) for t in tables]

    def _decode_slots(self, starts: list[int], padded: list[list[int]]) -> list[int]:
        """The cache slot of each sequence's one new token (decode-only steps), looked up on the host."""
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for table, p in zip(padded, starts)]

    def prepare_inputs(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """input_ids [T], positions [T] and the step's AttentionMetadata."""
        entries = out.scheduled
        bs = self.block_size
        token_ids, starts, lens, padded = self._host_lists(entries)
        if len(token_ids) == len(entries):
            return self._prepare_decode(token_ids, starts, padded)
        host = self._tensor([starts, lens], torch.int32)  # [2, B]
        block_tables = self._tensor(padded, torch.int32)
        input_ids = self._tensor(token_ids, torch.long)
        start_pos, query_lens = host[0], host[1]
        query_start_loc = torch.zeros(len(entries) + 1, dtype=torch.int32, device=self.device)
        torch.cumsum(query_lens, 0, out=query_start_loc[1:])
        num_tokens = len(token_ids)
        seq_idx = torch.repeat_interleave(torch.arange(len(entries), device=self.device), query_lens,
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
    def execute(self, out: SchedulerOutput, generators: Mapping[int, torch.Generator],
                prompt_logprobs_from: Mapping[int, int]) -> ModelRunnerOutput:
        """Run one step. `generators`: seq_id -> generator of seeded sequences;
        `prompt_logprobs_from`: seq_id -> first prompt position whose logprobs are missing."""
        self.copy_blocks(out.blocks_to_copy)
        entries = out.scheduled
        sampled: list[int | None] = [None] * len(entries)
        logprobs: list[Logprobs | None] = [None] * len(entries)
        if self._replays(out):
            # Decode only: every row samples, no prompt positions; the inputs go straight into
            # the graph's buffers, logits come from the graph.
            rows = list(range(len(entries)))
            prompt_logprobs: dict[int, list[Logprobs | None]] = {}
            token_ids, starts, _, padded = self._host_lists(entries)
            logits = self.decode_graphs.run(token_ids, starts, self._decode_slots(starts, padded),
                                            padded)  # [B, V] fp32
        elif self._replays_prefill(out, prompt_logprobs_from):
            # Prefill chunks (with or without decodes) from a captured graph: logits of every
            # sequence's last new token, of which the sampling rows are kept.
            prompt_logprobs = {}
            rows = [i for i, e in enumerate(entries) if e.do_sample]
            token_ids, starts, lens, padded = self._host_lists(entries)
            logits = self.prefill_graphs.run(token_ids, starts, lens, padded)  # [B, V] fp32
            if len(rows) < len(entries):
                logits = logits[torch.tensor(rows, device=self.device, dtype=torch.long)] if rows else None
        else:
            input_ids, positions, meta = self.prepare_inputs(out)
            with attention_metadata(meta):
                hidden = self.model(input_ids, positions)  # [T, D]
            ends = [0] * len(entries)
            end = 0
            for i, e in enumerate(entries):
                end += e.num_new_tokens
                ends[i] = end
            prompt_logprobs = self._prompt_logprobs(entries, ends, hidden, prompt_logprobs_from)
            rows = [i for i, e in enumerate(entries) if e.do_sample]
            logits = None
            if rows:
                last = torch.tensor([ends[i] - 1 for i in rows], device=self.device)
                logits = self.model.compute_logits(hidden[last])  # [S, V] fp32
        if rows:
            seqs = [entries[i].seq for i in rows]
            requests = [(s.sampling_params, s.prompt_token_ids, s.output_token_ids, generators.get(s.seq_id))
                        for s in seqs]
            metadata = SamplingMetadata.build(requests, self.vocab_size, self.eos_token_id, self.device)
            result = self.sampler(logits, metadata)
            for row, token_id in zip(rows, result.sampled_token_ids.tolist()):
                sampled[row] = token_id
            if result.logprobs is not None:
                for row, entry in zip(rows, result.logprobs.tolists(metadata.num_logprobs)):
                    logprobs[row] = entry
        return ModelRunnerOutput(sampled, logprobs, prompt_logprobs)

    def _prompt_logprobs(self, entries, ends: list[int], hidden: torch.Tensor,
                         prompt_logprobs_from: Mapping[int, int]) -> dict[int, list[Logprobs | None]]:
        """Prompt logprobs for the prompt positions this step computes that are not yet
        recorded: `prompt_logprobs_from[seq_id]` is the first one missing (a recompute
        after preemption covers recorded positions again and skips them)."""
        result: dict[int, list[Logprobs | None]] = {}
        for e, end in zip(entries, ends):
            first_pos = prompt_logprobs_from.get(e.seq.seq_id)
            if first_pos is None:
                continue
            lo = max(e.start_pos, first_pos)
            hi = min(e.start_pos + e.num_new_tokens, e.seq.num_prompt_tokens - 1)
            if hi <= lo and not (lo == 0 and e.seq.num_prompt_tokens == 1):
                continue
            row0 = end - e.num_new_tokens - e.start_pos  # hidden row of position 0
            chunk: list[Logprobs | None] = [] if lo > 0 else [None]
            for a in range(lo, hi, _PROMPT_LOGITS_ROWS):
                b = min(a + _PROMPT_LOGITS_ROWS, hi)
                logits = self.model.compute_logits(hidden[row0 + a:row0 + b])
                chunk += compute_prompt_logprobs(logits, e.seq.prompt_token_ids,
                                                 e.seq.sampling_params.prompt_logprobs, start=a)[1 if a == 0 else 0:]
            result[e.seq.seq_id] = chunk
        return result
