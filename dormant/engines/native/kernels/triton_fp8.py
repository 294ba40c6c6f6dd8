"""Triton kernels behind fp8_linear.py: dynamic activation quantization (one scale per row per
group of columns), the block-scaled FP8 GEMM of the 128 x 128 format, and for few rows (decode)
one kernel that does both, for either format.

Every float32 -> float8_e4m3fn conversion asks for round to nearest even (cvt.rn on the GPU),
as torch's conversion does: the torch reference and these kernels quantize to the same bytes.
(Triton 3.6's interpreter rounds wrongly; tests/unit/engines/native/test_fp8.py patches it.)

Imports triton at module level: only the CUDA path imports this module (and the CPU test that
runs these kernels through Triton's interpreter, TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dormant.engines.native.core.quantization import FP8_MAX, MIN_SCALE


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, stride_xm, n_cols, fp8_max, min_scale,
                          GROUP: tl.constexpr, BLOCK: tl.constexpr):
    """One program per (row, group of GROUP columns): amax in fp32, scale = amax / 448
    (at least min_scale), q = clamp(x / scale) rounded to float8_e4m3fn."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    x_row = x_ptr + row * stride_xm + g * GROUP
    q_row = q_ptr + row * n_cols + g * GROUP
    cols = tl.arange(0, BLOCK)
    if GROUP == BLOCK:  # the group in one load (the 1 x 128 format)
        x = tl.load(x_row + cols).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0) / fp8_max, min_scale)
        q = tl.clamp(x / scale, -fp8_max, fp8_max)
        tl.store(q_row + cols, q.to(q_ptr.dtype.element_ty, fp_downcast_rounding="rtne"))
    else:  # a whole row (per-token): amax over chunks, then a second pass
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, GROUP, BLOCK):
            x = tl.load(x_row + start + cols, mask=start + cols < GROUP, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, axis=0) / fp8_max, min_scale)
        for start in range(0, GROUP, BLOCK):
            mask = start + cols < GROUP
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            q = tl.clamp(x / scale, -fp8_max, fp8_max)
            tl.store(q_row + start + cols, q.to(q_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
    tl.store(s_ptr + row * (n_cols // GROUP) + g, scale)


def quantize_rows(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (last dim contiguous) -> (float8_e4m3fn [M, K], fp32 [M, K // group])."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, k // group), dtype=torch.float32, device=x.device)
    if m:
        block = min(triton.next_power_of_2(group), 1024)  # == group: one load; else chunks
        _quantize_rows_kernel[(m, k // group)](x, q, s, x.stride(0), k, FP8_MAX, MIN_SCALE,
                                               GROUP=group, BLOCK=block, num_warps=4 if group <= 1024 else 8)
    return q, s


@triton.jit
def _block_fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, stride_cm, num_bs_cols,
                           NUM_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C [M, N] = sum over 128-column groups k of (A_k . B_k^T) * as[m, k] * bs[n // 128, k].
    A [M, K] fp8 (row-major), B [N, K] fp8 (the weight, row-major), as [M, K / 128] fp32,
    bs [ceil(N / 128), K / 128] fp32. K = NUM_K * BLOCK_K, BLOCK_K = 128: a compile-time loop
    count (one kernel per input width, four in a model)."""
    K = NUM_K * BLOCK_K
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]  # [BLOCK_K, BLOCK_N] of B^T
    as_ptrs = as_ptr + offs_m * NUM_K
    bs_ptrs = bs_ptr + (offs_n // 128) * num_bs_cols
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, NUM_K):
        a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        a_s = tl.load(as_ptrs + k, mask=mask_m, other=0.0)
        b_s = tl.load(bs_ptrs + k, mask=mask_n, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _gemm_config(m: int, n: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Decode (few rows) is a read of the weight:
    narrow column tiles so every SM has one (132 on the H200), several loads in flight each;
    prompts: 64-row tiles for the tensor cores."""
    if m <= 16:
        return 16, (64 if n >= 8192 else 32), 4, 5
    if m <= 64:
        return 64, 64, 4, 4
    return 64, 128, 4, 3


def block_fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] fp8 with a_scale [M, K / 128]; b [N, K] fp8 with b_scale [N / 128, K / 128]
    -> [M, N] in out_dtype."""
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0:
        return c
    block_m, block_n, warps, stages = _gemm_config(m, n)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _block_fp8_gemm_kernel[grid](a, b, c, a_scale, b_scale, m, n, c.stride(0), b_scale.shape[1], NUM_K=k // 128,
                                 BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128, num_warps=warps, num_stages=stages)
    return c


@triton.jit
def _fused_fp8_gemm_kernel(x_ptr, b_ptr, c_ptr, bs_ptr, M, N, stride_xm, stride_cm, num_bs_cols, fp8_max, min_scale,
                           NUM_K: tl.constexpr, PER_TOKEN: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C = quantize(X) . B^T with X [M, K] bf16 quantized here, in registers, exactly as
    _quantize_rows_kernel does: PER_TOKEN, one scale per row (a first pass for its amax) and
    bs [N, 1] (channel format); else one per row per 128 columns and bs [N / 128, K / 128]
    (block format). Each program quantizes the rows it reads again: a decode step's few rows
    are a few KiB from L2, and the launch of a quantization kernel per GEMM is saved (four a
    layer, 144 a step of the 8B shape)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    K = NUM_K * BLOCK_K
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PER_TOKEN:
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k in range(0, NUM_K):
            x = tl.load(x_ptrs + k * BLOCK_K, mask=mask_m[:, None], other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        a_s = tl.maximum(amax / fp8_max, min_scale)
        for k in range(0, NUM_K):
            x = tl.load(x_ptrs + k * BLOCK_K, mask=mask_m[:, None], other=0.0).to(tl.float32)
            xq = tl.clamp(x / a_s[:, None], -fp8_max, fp8_max).to(b_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
            b = tl.load(b_ptrs + k * BLOCK_K, mask=mask_n[None, :], other=0.0)
            acc += tl.dot(xq, b)
        b_s = tl.load(bs_ptr + offs_n, mask=mask_n, other=0.0)
        acc = acc * a_s[:, None] * b_s[None, :]
    else:
        bs_ptrs = bs_ptr + (offs_n // 128) * num_bs_cols
        for k in range(0, NUM_K):
            x = tl.load(x_ptrs + k * BLOCK_K, mask=mask_m[:, None], other=0.0).to(tl.float32)
            a_s = tl.maximum(tl.max(tl.abs(x), axis=1) / fp8_max, min_scale)
            xq = tl.clamp(x / a_s[:, None], -fp8_max, fp8_max).to(b_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
            b = tl.load(b_ptrs + k * BLOCK_K, mask=mask_n[None, :], other=0.0)
            b_s = tl.load(bs_ptrs + k, mask=mask_n, other=0.0)
            acc += tl.dot(xq, b) * a_s[:, None] * b_s[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def fused_fp8_gemm(x: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, per_token: bool) -> torch.Tensor:
    """x [M, K] (M <= FUSED_MAX_M, K a multiple of 128, last dim contiguous) quantized in the
    GEMM; b [N, K] fp8; b_scale [N, 1] (per_token) or [N / 128, K / 128] -> [M, N] in x's dtype."""
    m, k = x.shape
    n = b.shape[0]
    c = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return c
    block_m, block_n, warps, stages = _gemm_config(m, n)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _fused_fp8_gemm_kernel[grid](x, b, c, b_scale, m, n, x.stride(0), c.stride(0), b_scale.shape[1], FP8_MAX, MIN_SCALE,
                                 NUM_K=k // 128, PER_TOKEN=per_token, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128,
                                 num_warps=warps, num_stages=stages)
    return c


FUSED_MAX_M = 64  # rows up to which fp8_linear quantizes inside the GEMM (decode steps)
