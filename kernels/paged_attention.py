"""Paged attention over a block-table KV cache: the pure-torch path (CPU and fallback),
the Triton dispatch (cache write, then decode or prefill attention) and a GPU self-check.

Cache layout, shared by every path (vLLM's, minus its x-packing of K):

    k_cache / v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    slot = block_id * block_size + offset      (the flattened [num_blocks * block_size] row)

    seq b, logical token t  ->  block block_tables[b, t // block_size], offset t % block_size

One step carries T new tokens of B sequences, flattened in order (query_start_loc). The
new tokens of seq b are its last query_len[b] positions: it had seq_lens[b] - query_len[b]
tokens cached before (a prefix-cache hit or earlier prefill chunks). Each new token
attends causally to every position up to its own, all read through the block table;
with a sliding window W (Mistral), only to the W positions ending at its own.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F


def write_kv_cache_reference(
    k: torch.Tensor,  # [T, Hkv, Dh]
    v: torch.Tensor,  # [T, Hkv, Dh]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    slot_mapping: torch.Tensor,  # [T] int64
) -> None:
    """Scatter this step's K/V rows into their slots (in place)."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    slots = slot_mapping.to(torch.long)
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v.to(v_cache.dtype))


def _gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor, num_blocks: int) -> torch.Tensor:
    # cache: [NB, bs, Hkv, Dh], block_tables: [B, >=num_blocks] -> [B, Hkv, num_blocks*bs, Dh]
    ids = block_tables[:, :num_blocks]
    _, block_size, num_kv_heads, head_dim = cache.shape
    # index_select on the flat id list is ~2x faster than advanced indexing on the CPU.
    rows = cache.index_select(0, ids.reshape(-1).to(device=cache.device, dtype=torch.long))
    return rows.view(ids.shape[0], ids.shape[1] * block_size, num_kv_heads, head_dim).transpose(1, 2)


def _decode_reference(
    q: torch.Tensor,  # [B, H, Dh], one new token per sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    max_seq_len: int,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """All sequences at once: one padded gather, keys past each seq_len (and before its
    window) masked out."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_blocks = min(math.ceil(max_seq_len / block_size), block_tables.shape[1])
    keys = _gather_blocks(k_cache, block_tables, num_blocks)  # [B, Hkv, L, Dh]
    values = _gather_blocks(v_cache, block_tables, num_blocks)
    positions = torch.arange(num_blocks * block_size, device=q.device)
    ends = seq_lens.to(q.device)[:, None]
    mask = positions[None, :] < ends  # [B, L]
    if sliding_window is not None:
        mask &= positions[None, :] >= ends - sliding_window
    # The G query heads sharing a KV head act as G query rows of that head: no K/V repeat.
    group = q.reshape(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim).to(keys.dtype)
    out = F.scaled_dot_product_attention(group, keys, values, attn_mask=mask[:, None, None, :], scale=scale)
    return out.reshape(num_seqs, num_heads, head_dim)


def _prefill_one_reference(
    q: torch.Tensor,  # [Lq, H, Dh], the new tokens of one sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [max_blocks] int32
    seq_len: int,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One sequence: gather its whole context, causal mask shifted by the cached length
    (and limited to the window)."""
    query_len, num_heads, _ = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_blocks = math.ceil(seq_len / block_size)
    keys = _gather_blocks(k_cache, block_table[None], num_blocks)[:, :, :seq_len]  # [1, Hkv, L, Dh]
    values = _gather_blocks(v_cache, block_table[None], num_blocks)[:, :, :seq_len]
    queries = q.transpose(0, 1)[None].to(keys.dtype)  # [1, H, Lq, Dh]
    context_len = seq_len - query_len
    windowed = sliding_window is not None and seq_len > sliding_window
    mask = None
    if context_len > 0 or windowed:
        key_pos = torch.arange(seq_len, device=q.device)
        query_pos = context_len + torch.arange(query_len, device=q.device)
        mask = key_pos[None, :] <= query_pos[:, None]  # [Lq, L]
        if windowed:
            mask &= key_pos[None, :] > query_pos[:, None] - sliding_window
    out = F.scaled_dot_product_attention(
        queries, keys, values, attn_mask=mask, is_causal=mask is None, scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    )
    return out[0].transpose(0, 1)


def paged_attention_reference(
    q: torch.Tensor,  # [T, H, Dh]
    k: torch.Tensor,  # [T, Hkv, Dh]
    v: torch.Tensor,  # [T, Hkv, Dh]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    slot_mapping: torch.Tensor,  # [T] int64
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32, context length after this step
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    sliding_window: int | None = None,  # keys a token sees, itself included; None: all
) -> torch.Tensor:
    """Write k/v into the cache, then attend through the block tables -> [T, H, Dh].

    Decode sequences (one new token) go through one batched gather; sequences with
    several new tokens run one SDPA each with a causal mask offset by their cached length.
    """
    write_kv_cache_reference(k, v, k_cache, v_cache, slot_mapping)
    if max_query_len == 1:
        return _decode_reference(
            q, k_cache, v_cache, block_tables, seq_lens, max_seq_len, scale, sliding_window
        ).to(q.dtype)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    out = torch.empty_like(q)
    decodes = [b for b in range(len(lens)) if starts[b + 1] - starts[b] == 1]
    if decodes:
        rows = torch.tensor([starts[b] for b in decodes], device=q.device)
        picked = torch.tensor(decodes, device=block_tables.device)
        out[rows] = _decode_reference(
            q[rows], k_cache, v_cache, block_tables[picked], seq_lens[picked], max(lens[b] for b in decodes), scale,
            sliding_window,
        ).to(q.dtype)
    for b, seq_len in enumerate(lens):
        start, end = starts[b], starts[b + 1]
        if end - start > 1:
            out[start:end] = _prefill_one_reference(
                q[start:end], k_cache, v_cache, block_tables[b], seq_len, scale, sliding_window
            )
    return out


def paged_attention_triton(
    q: torch.Tensor,  # [T, H, Dh]
    k: torch.Tensor,  # [T, Hkv, Dh]
    v: torch.Tensor,  # [T, Hkv, Dh]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    slot_mapping: torch.Tensor,  # [T] int64
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32, context length after this step
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Same contract as `paged_attention_reference`, in Triton; no host synchronization."""
    from llmctl_kernels.cache_write import reshape_and_cache
    from llmctl_kernels.decode_attention import paged_decode_attention
    from llmctl_kernels.prefill_attention import paged_prefill_attention

    reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
    if max_query_len == 1:
        return paged_decode_attention(
            q, k_cache, v_cache, block_tables, seq_lens, max_seq_len, scale, sliding_window=sliding_window
        )
    return paged_prefill_attention(
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, max_query_len, scale,
        sliding_window=sliding_window,
    )


def random_paged_batch(
    context_lens: list[int], query_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
    block_size: int, dtype: torch.dtype, device: str | torch.device = "cpu", seed: int = 0,
) -> dict:
    """Keyword arguments for `paged_attention_*`: shuffled block ids, random cache contents
    (sequence b had context_lens[b] tokens cached) and query_lens[b] new tokens."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in zip(context_lens, query_lens)]
    per_seq = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(per_seq) + 2
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots = [], []
    for seq_len, context_len, n in zip(seq_lens, context_lens, per_seq):
        blocks, ids = ids[:n], ids[n:]
        tables.append(blocks + [0] * (max(per_seq) - n))
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(context_len, seq_len)]

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    def ints(values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    num_tokens = sum(query_lens)
    return dict(
        q=rand(num_tokens, num_heads, head_dim), k=rand(num_tokens, num_kv_heads, head_dim),
        v=rand(num_tokens, num_kv_heads, head_dim),
        k_cache=rand(num_blocks, block_size, num_kv_heads, head_dim),
        v_cache=rand(num_blocks, block_size, num_kv_heads, head_dim),
        slot_mapping=ints(slots, torch.int64), block_tables=ints(tables, torch.int32),
        query_start_loc=ints([0, *itertools.accumulate(query_lens)], torch.int32),
        seq_lens=ints(seq_lens, torch.int32), max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        scale=head_dim**-0.5,
    )


def compare_with_reference(batch: dict) -> tuple[float, bool]:
    """Run both paths on copies of one batch -> (max |triton - torch|, caches equal)."""
    ref_batch = dict(batch, k_cache=batch["k_cache"].clone(), v_cache=batch["v_cache"].clone())
    tri_batch = dict(batch, k_cache=batch["k_cache"].clone(), v_cache=batch["v_cache"].clone())
    expected = paged_attention_reference(**ref_batch).float()
    actual = paged_attention_triton(**tri_batch).float()
    same_cache = torch.equal(ref_batch["k_cache"], tri_batch["k_cache"]) and torch.equal(
        ref_batch["v_cache"], tri_batch["v_cache"]
    )
    return (actual - expected).abs().max().item(), same_cache


SELFCHECK_CASES = {
    "prefill": ([0, 0, 0, 0], [1, 77, 300, 1024]),
    "prefix hit / chunk": ([64, 512, 17], [100, 33, 250]),
    "decode": ([5, 900, 3000, 0, 63] * 7, [1] * 35),
    "mixed": ([40, 700, 0, 2047, 16], [1, 1, 129, 1, 64]),
}


def _check_accuracy(device: str) -> bool:
    ok = True
    for (heads, kv_heads, head_dim), dtype, (name, (contexts, queries)) in itertools.product(
        [(32, 8, 128), (9, 3, 64)], [torch.float16, torch.bfloat16], SELFCHECK_CASES.items()
    ):
        batch = random_paged_batch(contexts, queries, heads, kv_heads, head_dim, 16, dtype, device)
        err, same_cache = compare_with_reference(batch)
        good = same_cache and err < (2e-2 if dtype == torch.float16 else 6e-2)
        ok &= good
        print(f"{'ok ' if good else 'BAD'} H={heads} Hkv={kv_heads} Dh={head_dim} {str(dtype):14} {name:18} "
              f"max|err|={err:.2e} cache_equal={same_cache}")
    return ok


def _time(label: str, batch: dict, work: str) -> None:
    """`work`: 'kv' (decode: report KV bytes read per second) or 'flops' (prefill)."""
    import triton.testing

    lens = batch["seq_lens"].tolist()
    queries = batch["query_start_loc"].diff().tolist()
    heads, head_dim = batch["q"].shape[1:]
    kv_heads = batch["k"].shape[1]
    for name, fn in (("triton", paged_attention_triton), ("torch", paged_attention_reference)):
        ms = triton.testing.do_bench(lambda: fn(**batch), warmup=25, rep=100)
        if work == "kv":
            rate = f"{2 * sum(lens) * kv_heads * head_dim * batch['k_cache'].element_size() / ms / 1e6:8.1f} GB/s KV"
        else:
            visible = sum(q * (n - q) + q * (q + 1) / 2 for q, n in zip(queries, lens))
            rate = f"{4 * heads * head_dim * visible / ms / 1e9:8.1f} TFLOP/s"
        print(f"  {label:28s} {name:7s} {ms * 1e3:9.1f} us  {rate}")


def selfcheck(device: str = "cuda") -> bool:
    """Triton vs the torch path on `device`, then timings at Llama-3-8B shapes (one layer)."""
    print(f"device: {torch.cuda.get_device_name(device)}")
    ok = _check_accuracy(device)
    print("one layer call (cache write + attention), H=32 Hkv=8 Dh=128 fp16, block 16")
    for num_seqs in (1, 32, 128):
        batch = random_paged_batch([1023] * num_seqs, [1] * num_seqs, 32, 8, 128, 16, torch.float16, device)
        _time(f"decode B={num_seqs} seq 1024", batch, "kv")
    prefills = (("prefill 1 x 1024", [0], [1024]), ("prefill 4 x (512 cached + 512)", [512] * 4, [512] * 4))
    for label, contexts, queries in prefills:
        _time(label, random_paged_batch(contexts, queries, 32, 8, 128, 16, torch.float16, device), "flops")
    return ok


if __name__ == "__main__":
    import sys

    if not torch.cuda.is_available():
        print("no CUDA device: the CPU interpreter checks are tests/test_kernels_paged_attention.py")
        sys.exit(2)
    sys.exit(0 if selfcheck("cuda") else 1)
