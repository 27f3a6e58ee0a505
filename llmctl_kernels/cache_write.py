"""Triton cache write (vLLM's reshape_and_cache): scatter this step's K/V rows into their
slots of the paged cache [num_blocks, block_size, Hkv, Dh]."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmctl_kernels.launch import launch_options, pdl_wait

# One program per token moves Hkv * Dh elements of K and of V: memory-bound, so small
# programs and no autotuning; 4 warps cover up to 8 x 128 halves in one pass.
NUM_WARPS = 4


@triton.jit
def _reshape_and_cache_kernel(
    # pointers
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    # sizes
    num_kv_heads, head_dim,
    # strides (the last dim of every tensor is contiguous)
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    # meta
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait(PDL)
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    # A negative slot marks a padding token (vLLM's convention): nothing to write.
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads < num_kv_heads)[:, None] & (dims < head_dim)[None, :]
    src = token.to(tl.int64) * stride_kt + heads[:, None] * stride_kh + dims[None, :]
    dst = block * stride_cb + offset * stride_cs + heads[:, None] * stride_ch + dims[None, :]
    k = tl.load(k_ptr + src, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    src = token.to(tl.int64) * stride_vt + heads[:, None] * stride_vh + dims[None, :]
    v = tl.load(v_ptr + src, mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(
    k: torch.Tensor,  # [T, Hkv, Dh]
    v: torch.Tensor,  # [T, Hkv, Dh]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    slot_mapping: torch.Tensor,  # [T] int64 or int32
) -> None:
    """Write k/v row t into the flattened cache row slot_mapping[t], in place."""
    num_tokens, num_kv_heads, head_dim = k.shape
    assert v.shape == k.shape, f"v {tuple(v.shape)} != k {tuple(k.shape)}"
    assert k_cache.dim() == 4 and k_cache.shape[2:] == (num_kv_heads, head_dim), (
        f"k_cache {tuple(k_cache.shape)} is not [num_blocks, block_size, {num_kv_heads}, {head_dim}]"
    )
    assert v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride()
    assert slot_mapping.shape == (num_tokens,), f"slot_mapping {tuple(slot_mapping.shape)} != [{num_tokens}]"
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.stride(-1) == 1, "last dims must be contiguous"
    assert k.device == k_cache.device == slot_mapping.device
    if num_tokens == 0:
        return
    _reshape_and_cache_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        num_kv_heads, head_dim,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=NUM_WARPS, **launch_options(k.device),
    )
