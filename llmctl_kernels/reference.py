"""Pure-torch GPTQ pack/unpack, dequantization and W4A16 matmul: the CPU path and the tests' oracle.

Layout (AutoGPTQ / GPTQModel, what transformers and vLLM load), per linear with in_features K,
out_features N, G groups and b bits:

    qweight  int32 [K*b/32, N]   codes packed along K, least significant bits first
    qzeros   int32 [G, N*b/32]   zero points packed along N the same way
    scales   fp16  [G, N]
    g_idx    int32 [K]           group of each input row (not monotone with act-order)

Codes form one little-endian bit stream per column (per row for qzeros): value i occupies bits
[i*b, (i+1)*b). For b in {2, 4, 8} no value crosses a word; for b=3, 32 values fill 3 words and
values 10 and 21 straddle word boundaries, exactly as AutoGPTQ packs them.

    W[k, n] = scales[g_idx[k], n] * (q[k, n] - (zeros[g_idx[k], n] + zero_offset))

with zero_offset=1 for checkpoint format `gptq` (v1 stores zero-1) and 0 for `gptq_v2`.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def pack_factor(bits: int) -> tuple[int, int]:
    """(values, words): `values` codes fill exactly `words` int32 words."""
    _check_bits(bits)
    return (32, 3) if bits == 3 else (32 // bits, 1)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret uint32 values held in int64 as int32 (two's complement)."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """values: [R, C] ints in [0, 2**bits) -> int32 [R*bits/32, C], packed along dim 0."""
    num_values, num_words = pack_factor(bits)
    rows, cols = values.shape
    if rows % num_values:
        raise ValueError(f"{bits}-bit packing needs a multiple of {num_values} values along the packed dim, got {rows}")
    v = values.to(torch.int64)
    if bool(((v < 0) | (v >= (1 << bits))).any()):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing")
    v = v.reshape(rows // num_values, num_values, cols)
    words = torch.zeros(rows // num_values, num_words + 1, cols, dtype=torch.int64, device=values.device)
    for i in range(num_values):
        word, shift = divmod(i * bits, 32)
        words[:, word] |= v[:, i] << shift  # the high part of a straddling value lands past bit 31
        if shift + bits > 32:
            words[:, word + 1] |= v[:, i] >> (32 - shift)
    return _to_int32(words[:, :num_words].reshape(rows // num_values * num_words, cols))


def _unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """packed: int32 [R*bits/32, C] -> int32 [R, C], the inverse of `_pack_rows`."""
    num_values, num_words = pack_factor(bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"packed tensor must be int32, got {packed.dtype}")
    prows, cols = packed.shape
    if prows % num_words:
        raise ValueError(f"{bits}-bit codes come in groups of {num_words} words, got {prows} rows")
    w = packed.to(torch.int64) & 0xFFFFFFFF
    w = w.reshape(prows // num_words, num_words, cols)
    mask = (1 << bits) - 1
    out = torch.empty(prows // num_words, num_values, cols, dtype=torch.int64, device=packed.device)
    for i in range(num_values):
        word, shift = divmod(i * bits, 32)
        val = w[:, word] >> shift
        if shift + bits > 32:
            val = val | (w[:, word + 1] << (32 - shift))
        out[:, i] = val & mask
    return out.reshape(prows // num_words * num_values, cols).to(torch.int32)


def pack_qweight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q: [K, N] integer codes -> qweight int32 [K*bits/32, N]."""
    return _pack_rows(q, bits)


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """qweight: int32 [K*bits/32, N] -> codes int32 [K, N]."""
    return _unpack_rows(qweight, bits)


def pack_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """zeros: [G, N] stored zero codes -> qzeros int32 [G, N*bits/32]."""
    return _pack_rows(zeros.t(), bits).t().contiguous()


def unpack_qzeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """qzeros: int32 [G, N*bits/32] -> stored zero codes int32 [G, N]."""
    return _unpack_rows(qzeros.t().contiguous(), bits).t().contiguous()


def dequantize_gptq(
    qweight: torch.Tensor,  # int32 [K*bits/32, N]
    qzeros: torch.Tensor,  # int32 [G, N*bits/32]
    scales: torch.Tensor,  # fp16/bf16/fp32 [G, N]
    g_idx: torch.Tensor,  # int [K]
    bits: int = 4,
    zero_offset: int = 1,
) -> torch.Tensor:
    """The dense weight [K, N] in scales' dtype, computed in fp32."""
    q = unpack_qweight(qweight, bits)
    zeros = unpack_qzeros(qzeros, bits)
    num_rows, n = q.shape
    if scales.dim() != 2 or scales.shape[1] != n or zeros.shape != scales.shape:
        raise ValueError(f"scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must both be [G, {n}]")
    g = g_idx.to(torch.long)
    if g.shape != (num_rows,):
        raise ValueError(f"g_idx must have shape [{num_rows}], got {tuple(g_idx.shape)}")
    if num_rows and (int(g.min()) < 0 or int(g.max()) >= scales.shape[0]):
        raise ValueError(f"g_idx values must lie in [0, {scales.shape[0]})")
    z = zeros.to(torch.float32)[g] + zero_offset
    w = scales.to(torch.float32)[g] * (q.to(torch.float32) - z)
    return w.to(scales.dtype)


def w4a16_matmul_reference(
    x: torch.Tensor,  # [M, K] fp16/bf16/fp32
    qweight: torch.Tensor,  # int32 [K*bits/32, N]
    qzeros: torch.Tensor,  # int32 [G, N*bits/32]
    scales: torch.Tensor,  # [G, N]
    g_idx: torch.Tensor,  # int [K]
    bias: torch.Tensor | None = None,  # [N]
    bits: int = 4,
    zero_offset: int = 1,
) -> torch.Tensor:
    """x @ W (+ bias) -> [M, N] in x's dtype; dequantization and accumulation in fp32."""
    q = unpack_qweight(qweight, bits)
    zeros = unpack_qzeros(qzeros, bits)
    g = g_idx.to(torch.long)
    w = scales.to(torch.float32)[g] * (q.to(torch.float32) - (zeros.to(torch.float32)[g] + zero_offset))
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {w.shape[0]}")
    out = x.to(torch.float32) @ w
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype)
