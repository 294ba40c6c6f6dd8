"""y = x W^T with W in FP8 (core/quantization.py's formats) and x quantized to FP8 per token
at run time: the matrix multiply reads FP8 bytes, never a bf16 copy of the weight.

    block (128 x 128 weight blocks): x quantized per token per 128 columns (Triton), then
        triton_fp8.block_fp8_gemm: one Triton GEMM applying both scales per 128-column step.
        Chosen over torch._scaled_mm's blockwise recipe (BlockWise1x128 x BlockWise128x128),
        which needs a torch built against CUDA >= 12.9 (cuBLASLt's block scaling) and pads M to
        a multiple of 4; the GPU machine's torch 2.11 build is not known to have it, Triton
        runs on any build and inside our CUDA graphs alike.
    channel (one scale per output row): x quantized per token (Triton), then torch._scaled_mm
        with rowwise scales (scale_a [M, 1], scale_b [1, N], fp32): CUTLASS's rowwise FP8
        kernel on Hopper, in torch since 2.5.

Up to FUSED_MAX_M rows (decode steps) one Triton kernel does both for either format: it
quantizes the activations in registers as the quantization kernel would, so a decode step
launches one kernel per GEMM, as bf16 does, where the two above launch two. Two such kernels:
    fp8_gemv        many small programs, K split among them: a read of the weight at HBM
                    speed for the fewest rows (fused_fp8_gemm's N / 32 programs left the FP8
                    8B model at 152 tok/s decoding, below bf16's 181); where gemv_config
                    gives a config (kernels/gemv_table.py: measured per GPU model
                    by bench/bench_fp8_gemv.py --write-table)
    fused_fp8_gemm  tensor-core tiles over N, for the other decode sizes

On the CPU the same arithmetic in fp32 torch ops (quantize x exactly as the kernel does,
dequantize both, matmul): the reference the GPU kernels are tested against, and what the
compact decoder's CPU tests run. It is not a serving path: the CPU engine refuses FP8
checkpoints (cpu/model_loader.py).
"""

from __future__ import annotations

import functools

import torch

from dormant.engines.native.core.quantization import FP8Format, dequantize_weight, quantize_activation


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, fmt: FP8Format,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] (any float dtype) -> [T, N] in x's dtype; weight [N, K] float8_e4m3fn, scale
    as fmt stores it (block: [N / 128, K / 128]; channel: [N, 1]), both fp32."""
    if x.is_cuda:
        y = _fp8_linear_cuda(x, weight, scale, fmt)
    else:
        group = fmt.block or x.shape[1]
        q, s = quantize_activation(x, group)
        xd = (q.float().view(q.shape[0], -1, group) * s.unsqueeze(-1)).view(q.shape)
        y = (xd @ dequantize_weight(weight, scale, fmt).t()).to(x.dtype)
    return y if bias is None else y + bias


def _fp8_linear_cuda(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    from dormant.engines.native.kernels.gemv_table import gemv_config
    from dormant.engines.native.kernels.triton_fp8 import (
        FUSED_MAX_M, block_fp8_gemm, fp8_gemv, fused_fp8_gemm, quantize_rows,
    )

    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    per_token = fmt.block is None
    if m <= FUSED_MAX_M and k % 128 == 0:
        config = gemv_config(m, weight.shape[0], k, per_token, _device_name(x.device.index) if x.is_cuda else None)
        if config is not None:
            return fp8_gemv(x, weight, scale, per_token, config)
        return fused_fp8_gemm(x, weight, scale, per_token)
    if fmt.block is not None:
        q, s = quantize_rows(x, fmt.block)
        return block_fp8_gemm(q, s, weight, scale, x.dtype)
    q, s = quantize_rows(x, x.shape[1])
    return torch._scaled_mm(q, weight.t(), scale_a=s, scale_b=scale.view(1, -1), out_dtype=x.dtype)


@functools.lru_cache(maxsize=None)
def _device_name(index: int | None) -> str:
    """The GPU's model name, which its GEMV configs are kept under (asked once per device)."""
    return torch.cuda.get_device_name(index)
