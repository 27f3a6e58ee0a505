"""The paged-attention self-check on a GPU: Triton against the torch path on the cases below,
then one layer's timings at Llama-3-8B shapes. Run `python tests/paged_attention_selfcheck.py`
(the CPU interpreter's checks are tests/test_kernels_paged_attention.py)."""

from __future__ import annotations

import itertools

import torch
from paged_attention_helpers import compare_with_reference, random_paged_batch

from llmctl_kernels.paged_attention import paged_attention_reference, paged_attention_triton

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
