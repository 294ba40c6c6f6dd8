"""Triton kernels behind fp8_linear.py: dynamic activation quantization (one scale per row per
group of columns), the block-scaled FP8 GEMM of the 128 x 128 format, and for few rows (decode)
kernels that do both, for either format: fused_fp8_gemm (tensor-core tiles over N) and
fp8_gemv (many small programs, split over K, for the fewest rows: a read of the weight).

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
from dormant.engines.native.kernels.gemv_table import (  # noqa: F401 - the GEMV's launch shapes, re-exported
    GEMV_MAX_M, GEMV_TABLE, GemvConfig, gemv_config, guess_gemv_config, split_for,
)

COUNTER_SLOTS = 1 << 14  # split-K tickets, one per (row tile, N strip): 64 KiB, allocated once


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


# -- decode's few rows: a read of the weight at HBM speed -------------------------------------------
#
# At 1-16 rows a GEMM is a read of the weight: Qwen3-8B's qkv at FP8 is 25 MB, 6 us at the
# H200's ~4 TB/s. fused_fp8_gemm's 16 x 32 tiles make N / 32 programs (128 for N = 4096 on 132
# SMs), ~20 KB in flight per SM: the FP8 model decoded at 152 tok/s, below bf16's 181
# (issue 12). fp8_gemv cuts the weight into BLOCK_N-row strips and K into SPLIT_K ranges, so a
# GEMM has several programs per SM, each loading BLOCK_N x BLOCK_K bytes per step. Partial sums
# go to an fp32 buffer; the last program of a strip (a ticket counter) adds them in split order
# (the same bits every run: greedy decode must not change across a sleep) and writes the rows.


@triton.jit
def _store_rows(c_ptr, acc, a_s, bs_ptr, offs_m, offs_n, mask_m, mask_n, stride_cm, PER_TOKEN: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] (fp32, channel format: still to be scaled) -> C's rows."""
    if PER_TOKEN:
        b_s = tl.load(bs_ptr + offs_n, mask=mask_n, other=0.0)
        acc = acc * a_s[:, None] * b_s[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["M", "split_k"])  # M = 1 or 16, split 1: no compile of their own
def _fp8_gemv_kernel(x_ptr, b_ptr, c_ptr, bs_ptr, part_ptr, count_ptr, M, N, K, split_k, stride_xm, stride_cm,
                     num_bs_cols, fp8_max, min_scale, PER_TOKEN: tl.constexpr, USE_DOT: tl.constexpr,
                     IS_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     AMAX_COLS: tl.constexpr):
    """C = quantize(X) . B^T, program (n strip, k range, m tile): the arithmetic of
    _fused_fp8_gemm_kernel (X quantized in registers as _quantize_rows_kernel does, products
    summed in fp32, block format: both scales per 128 columns; channel: at the end), over
    K / split_k columns. PER_TOKEN: each program reads the whole rows for their amax first
    (a few KiB from L2). K and split_k are runtime values: one compile serves every shape."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, 128)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    if USE_DOT:
        b_group = b_ptr + offs_n[None, :].to(tl.int64) * K + offs_c[:, None]  # [128, BLOCK_N] of B^T
    else:
        b_group = b_ptr + offs_n[:, None].to(tl.int64) * K + offs_c[None, :]  # [BLOCK_N, 128]
    a_s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if PER_TOKEN:
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for start in range(0, K, AMAX_COLS):
            cols = start + tl.arange(0, AMAX_COLS)
            x = tl.load(x_rows + cols[None, :], mask=mask_m[:, None] & (cols[None, :] < K), other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
        a_s = tl.maximum(amax / fp8_max, min_scale)
    # K offsets as multiples of BLOCK_K: the compiler then knows each row's 128 bytes are
    # 16-byte aligned (K itself specialized as a multiple of 16) and loads them 16 at a time
    steps = K // (split_k * BLOCK_K)
    k_start = pid_k * steps * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, steps):
        for g in tl.static_range(BLOCK_K // 128):
            k = k_start + step * BLOCK_K + g * 128
            x = tl.load(x_rows + k + offs_c[None, :], mask=mask_m[:, None], other=0.0).to(tl.float32)
            if not PER_TOKEN:
                a_s = tl.maximum(tl.max(tl.abs(x), axis=1) / fp8_max, min_scale)
            xq = tl.clamp(x / a_s[:, None], -fp8_max, fp8_max).to(b_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
            if USE_DOT:
                part = tl.dot(xq, tl.load(b_group + k, mask=mask_n[None, :], other=0.0))
            else:
                b = tl.load(b_group + k, mask=mask_n[:, None], other=0.0)
                part = tl.sum(xq.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], axis=2)
            if PER_TOKEN:
                acc += part
            else:
                b_s = tl.load(bs_ptr + (offs_n // 128) * num_bs_cols + k // 128, mask=mask_n, other=0.0)
                acc += part * a_s[:, None] * b_s[None, :]
    _finish(c_ptr, acc, a_s, bs_ptr, part_ptr, count_ptr, offs_m, offs_n, mask_m, mask_n, pid_m, pid_n, pid_k,
            M, N, split_k, stride_cm, PER_TOKEN, IS_SPLIT, BLOCK_M, BLOCK_N)


@triton.jit
def _finish(c_ptr, acc, a_s, bs_ptr, part_ptr, count_ptr, offs_m, offs_n, mask_m, mask_n, pid_m, pid_n, pid_k,
            M, N, split_k, stride_cm, PER_TOKEN: tl.constexpr, IS_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr):
    """A program's partial sums [BLOCK_M, BLOCK_N] -> C's rows: at once when K is not split;
    else into the fp32 buffer, and the strip's last program (its ticket) adds the split_k
    partials in split order and writes the rows."""
    if IS_SPLIT:
        mask = mask_m[:, None] & mask_n[None, :]
        parts = part_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(parts + pid_k * M * N, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken
        count = count_ptr + pid_m * tl.num_programs(0) + pid_n
        if tl.atomic_add(count, 1) == split_k - 1:  # acq_rel, GPU scope: the others' partials are visible
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(0, split_k):  # in split order, own partial included: the same sum every run
                acc += tl.load(parts + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(count, 0)  # ready for the next GEMM: the tickets are never zeroed again
            _store_rows(c_ptr, acc, a_s, bs_ptr, offs_m, offs_n, mask_m, mask_n, stride_cm, PER_TOKEN)
    else:
        _store_rows(c_ptr, acc, a_s, bs_ptr, offs_m, offs_n, mask_m, mask_n, stride_cm, PER_TOKEN)


@triton.jit(do_not_specialize=["split_k"])
def _fp8_gemv_a16_kernel(x_ptr, b_ptr, c_ptr, bs_ptr, part_ptr, count_ptr, N, K, split_k, stride_cm, num_bs_cols,
                         PER_TOKEN: tl.constexpr, IS_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """c = x . dequantize(B)^T for one row, weight-only: x stays in bf16 (read as fp32), each
    FP8 weight byte is converted in registers and scaled by its block's scale (channel: each
    output by its row's, at the end). No activation quantization, so no per-group amax (a
    reduction across threads) in the loop, and the products pile up in a [BLOCK_N, BLOCK_K]
    accumulator summed over K once, at the end: the loop is loads and multiply-adds, and the
    next step's weight tile is loaded before this one's are added. Program (n strip, k range);
    a strip of BLOCK_N rows (dividing 128) lies in one 128-row scale block."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, 1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    b_rows = b_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    scale_row = bs_ptr + (pid_n * BLOCK_N // 128) * num_bs_cols
    steps = K // (split_k * BLOCK_K)
    k = pid_k * steps * BLOCK_K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    b = tl.load(b_rows + k, mask=mask_n[:, None], other=0.0)
    for step in range(0, steps):
        # x read as a [BLOCK_N, BLOCK_K] tile (every row the same, from L1), close to the weight
        # tile's layout: a [BLOCK_K] vector broadcast over the rows went through shared memory,
        # eight barriers a step (PTX for sm_90); this way two
        x = tl.load(x_ptr + k + offs_k[None, :] + 0 * offs_n[:, None]).to(tl.float32)
        if not PER_TOKEN:
            x = x * tl.load(scale_row + (k + offs_k[None, :]) // 128)
        b_next = tl.load(b_rows + k + BLOCK_K, mask=mask_n[:, None] & (step + 1 < steps), other=0.0)
        acc += b.to(tl.float32) * x
        b = b_next
        k += BLOCK_K
    out = tl.sum(acc, axis=1)[None, :]  # [1, BLOCK_N]
    _finish(c_ptr, out, tl.full((1,), 1.0, tl.float32), bs_ptr, part_ptr, count_ptr, offs_m, offs_n, offs_m < 1,
            mask_n, 0, pid_n, pid_k, 1, N, split_k, stride_cm, PER_TOKEN, IS_SPLIT, 1, BLOCK_N)


_counters: dict[torch.device, torch.Tensor] = {}


def _split_counters(device: torch.device, slots: int) -> torch.Tensor | None:
    """The device's ticket counters (zeros, each split-K GEMM leaves them zero), or None when
    there are too few or they would be made inside a CUDA graph capture (the buffer would be
    the graph pool's): that GEMM runs unsplit. graphs.py runs each size once before capturing."""
    counters = _counters.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = _counters[device] = torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)
    return counters if slots <= counters.numel() else None


def fp8_gemv(x: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, per_token: bool,
             config: GemvConfig | None = None) -> torch.Tensor:
    """fused_fp8_gemm's contract (x [M, K] bf16, K a multiple of 128; b [N, K] fp8; b_scale
    [N, 1] or [N / 128, K / 128]) for few rows; config: gemv_config's when not given."""
    m, k = x.shape
    n = b.shape[0]
    config = config or gemv_config(m, n, k, per_token)
    if config is None or not config.fits(k) or config.block_k % 128:
        raise ValueError(f"fp8_gemv: no usable config ({config}) for M={m}, N={n}, K={k}")
    c = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return c
    if config.a16 and (m != 1 or x.stride(-1) != 1 or 128 % config.block_n):
        raise ValueError(f"fp8_gemv: the weight-only config {config} takes one contiguous row and strips "
                         f"dividing 128, not M={m}")
    block_m = 16 if config.use_dot else triton.next_power_of_2(m)
    grid_n, grid_m = triton.cdiv(n, config.block_n), triton.cdiv(m, block_m)
    split_k, counters = config.split_k, None
    if split_k > 1:
        counters = _split_counters(x.device, grid_n * grid_m)
        split_k = split_k if counters is not None else 1
    part = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split_k > 1 else c
    if config.a16:
        _fp8_gemv_a16_kernel[(grid_n, split_k)](
            x, b, c, b_scale, part, c if counters is None else counters, n, k, split_k, c.stride(0), b_scale.shape[1],
            PER_TOKEN=per_token, IS_SPLIT=split_k > 1, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            num_warps=config.num_warps, num_stages=config.num_stages)
        return c
    _fp8_gemv_kernel[(grid_n, split_k, grid_m)](
        x, b, c, b_scale, part, c if counters is None else counters, m, n, k, split_k, x.stride(0), c.stride(0),
        b_scale.shape[1], FP8_MAX, MIN_SCALE, PER_TOKEN=per_token, USE_DOT=config.use_dot, IS_SPLIT=split_k > 1,
        BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, AMAX_COLS=max(128, 4096 // block_m),
        num_warps=config.num_warps, num_stages=config.num_stages)
    return c
