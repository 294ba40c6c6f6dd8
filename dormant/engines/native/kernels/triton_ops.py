"""Triton kernels behind fused_ops.py: one launch each where transformers' layer runs several
(bench/README.md, "Engine: kernel count at batch 1": at batch 1 the 8B step was bound by its ~45 kernels per layer).

Imports triton at module level: only the CUDA path imports this module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                         HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    if HAS_RES:
        x = x + tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0)
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = (h * rstd).to(x.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm_cuda(x, residual, weight, eps):
    x = x.contiguous()
    rows, n = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    block = triton.next_power_of_2(n)
    _add_rms_norm_kernel[(rows,)](x, residual if residual is not None else x, weight, out, res_out, n, eps,
                                  HAS_RES=residual is not None, BLOCK=block, num_warps=min(16, max(4, block // 512)))
    return out, res_out


@triton.jit
def _norm_rope(base, w_ptr, cos, sin, dims, eps, HALF: tl.constexpr, HAS_NORM: tl.constexpr):
    """One head at `base`: RMSNorm by w_ptr (HAS_NORM), then the rotary embedding; fp32 out."""
    raw1 = tl.load(base + dims)
    raw2 = tl.load(base + HALF + dims)
    x1, x2 = raw1.to(tl.float32), raw2.to(tl.float32)
    if HAS_NORM:
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF) + eps)
        w1 = tl.load(w_ptr + dims).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + dims).to(tl.float32)
        x1 = ((x1 * rstd).to(raw1.dtype).to(tl.float32) * w1).to(raw1.dtype).to(tl.float32)
        x2 = ((x2 * rstd).to(raw1.dtype).to(tl.float32) * w2).to(raw1.dtype).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _qk_norm_rope_cache_kernel(qkv_ptr, pos_ptr, rope_ptr, qw_ptr, kw_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                               stride_t, stride_rope, stride_cs, stride_ch, eps,
                               NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                               HALF: tl.constexpr, HAS_NORM: tl.constexpr):
    """Grid (token, q head or kv head): q heads are rotated in place, kv heads write K (rotated)
    and V to the cache."""
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    dims = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + t)
    cos = tl.load(rope_ptr + pos * stride_rope + dims).to(tl.float32)
    sin = tl.load(rope_ptr + pos * stride_rope + HALF + dims).to(tl.float32)
    dtype = qkv_ptr.dtype.element_ty
    base = qkv_ptr + t * stride_t + head * HEAD_DIM
    if head < NUM_HEADS:
        o1, o2 = _norm_rope(base, qw_ptr, cos, sin, dims, eps, HALF, HAS_NORM)
        tl.store(base + dims, o1.to(dtype))
        tl.store(base + HALF + dims, o2.to(dtype))
    else:
        o1, o2 = _norm_rope(base, kw_ptr, cos, sin, dims, eps, HALF, HAS_NORM)
        slot = tl.load(slot_ptr + t)
        dst = slot * stride_cs + (head - NUM_HEADS) * stride_ch
        tl.store(k_cache_ptr + dst + dims, o1.to(dtype))
        tl.store(k_cache_ptr + dst + HALF + dims, o2.to(dtype))
        v_base = base + NUM_KV_HEADS * HEAD_DIM
        tl.store(v_cache_ptr + dst + dims, tl.load(v_base + dims))
        tl.store(v_cache_ptr + dst + HALF + dims, tl.load(v_base + HALF + dims))


def qk_norm_rope_cache_cuda(qkv, positions, rope, q_norm, k_norm, eps, k_cache, v_cache, slot_mapping,
                            num_heads, num_kv_heads, head_dim):
    t = qkv.shape[0]
    has_norm = q_norm is not None
    _qk_norm_rope_cache_kernel[(t, num_heads + num_kv_heads)](
        qkv, positions, rope, q_norm if has_norm else qkv, k_norm if has_norm else qkv,
        k_cache, v_cache, slot_mapping,
        qkv.stride(0), rope.stride(0), k_cache.stride(0), k_cache.stride(1), eps,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF=head_dim // 2, HAS_NORM=has_norm,
        num_warps=1)


@triton.jit
def _silu_and_mul_kernel(gu_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(gu_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0)
    u = tl.load(gu_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (s * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_cuda(gate_up):
    gate_up = gate_up.contiguous()
    rows, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((rows, n), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](gate_up, out, n, BLOCK=block, num_warps=4)
    return out
