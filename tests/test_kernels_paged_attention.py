"""Paged-attention Triton kernels against the torch path: under the CPU interpreter
here, compiled on the device where CUDA is present.

Small shapes, fresh random inputs, outputs poisoned with NaN so an unwritten element
fails. Interpreter tolerances: float32 1e-5 (same math, other summation order), float16
2e-3 and bfloat16 2e-2 (the torch path rounds its SDPA inputs/outputs in the half
dtype); on a GPU the kernels' dots take half inputs, so 1e-2 and 4e-2.
"""

from __future__ import annotations

import os

import pytest
import torch

# Read when the kernels are decorated, so it must be set before llmctl_kernels/* import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRETING else "cuda"

pytest.importorskip("triton")

from paged_attention_helpers import compare_with_reference, random_paged_batch  # noqa: E402

from llmctl_kernels.cache_write import reshape_and_cache  # noqa: E402
from llmctl_kernels.decode_attention import paged_decode_attention  # noqa: E402
from llmctl_kernels.paged_attention import paged_attention_reference, write_kv_cache_reference  # noqa: E402
from llmctl_kernels.prefill_attention import paged_prefill_attention  # noqa: E402

if INTERPRETING:
    TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
else:
    TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def _seed() -> int:
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    print(f"random_paged_batch seed={seed}")  # shown by pytest when the test fails
    return seed


def _reference_out(batch: dict) -> torch.Tensor:
    """The torch path on copies; leaves `batch` caches holding this step's K/V too."""
    out = paged_attention_reference(**dict(batch, k_cache=batch["k_cache"].clone(), v_cache=batch["v_cache"].clone()))
    write_kv_cache_reference(batch["k"], batch["v"], batch["k_cache"], batch["v_cache"], batch["slot_mapping"])
    return out


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert not actual.isnan().any(), "kernel left elements unwritten"
    torch.testing.assert_close(actual.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_write_matches_index_copy(dtype):
    batch = random_paged_batch([3, 0, 9], [5, 7, 1], 6, 2, 24, 4, dtype, DEVICE, seed=_seed())
    # k/v as strided views of a fused projection, as the model produces them.
    fused = torch.randn(13, 3, 2, 24).to(device=DEVICE, dtype=dtype)
    k, v = fused[:, 1], fused[:, 2]
    expected_k, expected_v = batch["k_cache"].clone(), batch["v_cache"].clone()
    write_kv_cache_reference(k, v, expected_k, expected_v, batch["slot_mapping"])
    reshape_and_cache(k, v, batch["k_cache"], batch["v_cache"], batch["slot_mapping"])
    assert torch.equal(batch["k_cache"], expected_k)
    assert torch.equal(batch["v_cache"], expected_v)


def test_cache_write_skips_negative_slots():
    batch = random_paged_batch([0], [4], 2, 2, 16, 4, torch.float32, DEVICE, seed=_seed())
    before = batch["k_cache"].clone()
    slots = batch["slot_mapping"].clone()
    slots[1] = -1
    reshape_and_cache(batch["k"], batch["v"], batch["k_cache"], batch["v_cache"], slots)
    changed = (batch["k_cache"] != before).any(-1).any(-1).flatten().nonzero().flatten().tolist()
    assert sorted(changed) == sorted(s for s in slots.tolist() if s >= 0)


@pytest.mark.parametrize(
    "heads,head_dim,block_size,dtype,num_splits",
    [
        ((6, 2), 16, 4, torch.float32, 1),
        ((9, 3), 24, 16, torch.float32, 3),
        ((4, 4), 32, 4, torch.float16, 2),
        ((6, 2), 16, 16, torch.bfloat16, 4),
    ],
)
def test_decode_kernel(heads, head_dim, block_size, dtype, num_splits):
    contexts = [0, 40, 7, 23]
    queries = [1] * len(contexts)
    batch = random_paged_batch(contexts, queries, *heads, head_dim, block_size, dtype, DEVICE, seed=_seed())
    expected = _reference_out(batch)
    out = torch.full_like(batch["q"], float("nan"))
    paged_decode_attention(
        batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"], batch["seq_lens"],
        batch["max_seq_len"], batch["scale"], num_splits=num_splits, out=out,
    )
    _assert_close(out, expected, dtype)


@pytest.mark.parametrize(
    "contexts,queries,heads,head_dim,block_size,dtype",
    [
        ([0, 0, 0], [1, 13, 22], (6, 2), 16, 4, torch.float32),  # plain prefill
        ([0, 8], [17, 9], (9, 3), 24, 16, torch.float16),  # chunk 1 / prefix hit on a block edge
        ([11, 16], [14, 3], (4, 4), 16, 4, torch.bfloat16),  # chunk 2 starting mid-block
        ([5, 30, 0, 9], [1, 1, 12, 1], (9, 3), 16, 16, torch.float32),  # decodes + a chunk
    ],
)
def test_prefill_kernel(contexts, queries, heads, head_dim, block_size, dtype):
    batch = random_paged_batch(contexts, queries, *heads, head_dim, block_size, dtype, DEVICE, seed=_seed())
    expected = _reference_out(batch)
    out = torch.full_like(batch["q"], float("nan"))
    paged_prefill_attention(
        batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"], batch["query_start_loc"],
        batch["seq_lens"], batch["max_query_len"], batch["scale"], out=out,
    )
    _assert_close(out, expected, dtype)


@pytest.mark.parametrize("window,num_splits", [(6, 3), (20, 1)])
def test_decode_kernel_with_sliding_window(window, num_splits):
    """Slices tile only the window's keys; contexts shorter and longer than the window."""
    contexts = [0, 40, 5, 23, 70]
    batch = random_paged_batch(contexts, [1] * len(contexts), 6, 2, 16, 4, torch.float32, DEVICE, seed=_seed())
    batch["sliding_window"] = window
    expected = _reference_out(batch)
    out = torch.full_like(batch["q"], float("nan"))
    paged_decode_attention(
        batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"], batch["seq_lens"],
        batch["max_seq_len"], batch["scale"], num_splits=num_splits, out=out, sliding_window=window,
    )
    _assert_close(out, expected, torch.float32)


@pytest.mark.parametrize(
    "contexts,queries,heads,dtype,window",
    [
        ([0, 0, 0], [1, 13, 40], (6, 2), torch.float32, 5),  # plain prefill; a row tile spans the window
        ([11, 30, 2], [14, 3, 1], (4, 4), torch.float32, 16),  # chunks after a window's worth of context
        ([0, 8], [21, 9], (9, 3), torch.float16, 1),  # each token sees only itself
    ],
)
def test_prefill_kernel_with_sliding_window(contexts, queries, heads, dtype, window):
    batch = random_paged_batch(contexts, queries, *heads, 16, 4, dtype, DEVICE, seed=_seed())
    batch["sliding_window"] = window
    expected = _reference_out(batch)
    out = torch.full_like(batch["q"], float("nan"))
    paged_prefill_attention(
        batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"], batch["query_start_loc"],
        batch["seq_lens"], batch["max_query_len"], batch["scale"], out=out, sliding_window=window,
    )
    _assert_close(out, expected, dtype)


@pytest.mark.parametrize(
    "contexts,queries",
    [([3, 20], [1, 1]), ([0, 6, 2], [10, 1, 5])],
)
def test_triton_dispatch_writes_the_cache_then_attends(contexts, queries):
    batch = random_paged_batch(contexts, queries, 6, 2, 16, 4, torch.float16, DEVICE, seed=_seed())
    err, same_cache = compare_with_reference(batch)
    assert same_cache
    assert err < TOL[torch.float16] * 4, err


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_on_gpu_match_torch_path(dtype):
    if INTERPRETING:
        pytest.skip("needs CUDA without the interpreter")
    for contexts, queries in ([[0, 0], [300, 77]], [[64, 511, 0], [100, 1, 1]], [[5, 900, 3000], [1, 1, 1]]):
        for window in (None, 100, 4096):
            batch = random_paged_batch(contexts, queries, 32, 8, 128, 16, dtype, "cuda", seed=_seed())
            err, same_cache = compare_with_reference(dict(batch, sliding_window=window))
            assert same_cache
            assert err < (2e-2 if dtype == torch.float16 else 6e-2), (window, err)
