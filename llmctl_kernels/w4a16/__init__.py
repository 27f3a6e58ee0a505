"""W4A16 matmul over GPTQ weights (4-bit codes, fp16/bf16 activations), as one package:

    layout.py      the prepared weights (`W4A16Weights`), act-order sorting, the fragment layout
    ptx.py         inline PTX templates, rendered with a check that every placeholder is filled
    common.py      Triton pieces every kernel shares
    scratch.py     the split-K policy and its one scratch buffer (`SplitKScratch`)
    gptq_tiles.py, gemv.py, gemm.py              the checkpoint layout's kernels
    frag_tiles.py, frag_gemv.py, frag_gemm.py   the fragment layout's kernels
    dequant.py     dequantize to a dense weight (the cuBLAS path at large M)
    config.py      `KernelConfig` and the per-GPU tables (tables.json) that dispatch by M
    dispatch.py    `w4a16_matmul`, the one entry point
    tune.py        the tuner that measures every candidate and writes tables.json (a tool)

Usage (what `GPTQLinear` does on CUDA):

    weights = prepare_w4a16_weights(qweight, qzeros, scales, g_idx, bits=4, zero_offset=1)
    scratch = SplitKScratch(device, max_rows, max_cols)   # once, at engine start
    out = w4a16_matmul(x, weights, bias, scratch=scratch)  # x: [..., K] fp16/bf16 -> [..., N]

docs/benchmarks.md has the measurements behind every choice.
"""

from llmctl_kernels.w4a16.config import PATHS, KernelConfig, device_name, select_path
from llmctl_kernels.w4a16.dequant import w4a16_dequantize
from llmctl_kernels.w4a16.dispatch import w4a16_matmul
from llmctl_kernels.w4a16.layout import LAYOUTS, TRITON_BITS, W4A16Weights, prepare_w4a16_weights
from llmctl_kernels.w4a16.scratch import SPLIT_K_MAX_M, SplitKScratch

__all__ = [
    "LAYOUTS", "PATHS", "SPLIT_K_MAX_M", "TRITON_BITS", "KernelConfig", "SplitKScratch", "W4A16Weights",
    "device_name", "prepare_w4a16_weights", "select_path", "w4a16_dequantize", "w4a16_matmul",
]
