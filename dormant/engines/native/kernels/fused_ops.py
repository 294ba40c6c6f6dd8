"""The compact decoder's fused ops (cuda/compact_decoder.py): a Triton kernel each on CUDA
(triton_ops.py), the same arithmetic in plain torch elsewhere (CPU tests, and the reference
the kernels are checked against). Rounding follows transformers' Llama-family code: a norm's
output is rounded to the activation dtype before the weight multiplies it, residual sums are
rounded before they are normalized, silu's output is rounded before the multiply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual) * weight, x + residual); residual None: x alone."""
    if x.is_cuda:
        from dormant.engines.native.kernels.triton_ops import add_rms_norm_cuda

        return add_rms_norm_cuda(x, residual, weight, eps)
    if residual is not None:
        x = x + residual
    return weight * _normed(x, eps), x


def _normed(x: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def qk_norm_rope_cache(qkv: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor,
                       q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                       num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """qkv [T, (H + 2 Hkv) D]: per-head RMSNorm of q and k (Qwen3; None: none), rotary
    embedding of both (rope [max_pos, D]: cos of the first half, sin of it), K and V written
    to the cache at slot_mapping. q is rotated in place; returns it as a [T, H, D] view."""
    t = qkv.shape[0]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    if qkv.is_cuda:
        from dormant.engines.native.kernels.triton_ops import qk_norm_rope_cache_cuda

        qk_norm_rope_cache_cuda(qkv, positions, rope, q_norm, k_norm, eps, k_cache, v_cache, slot_mapping,
                                num_heads, num_kv_heads, head_dim)
        return qkv[:, :q_size].view(t, num_heads, head_dim)
    q = qkv[:, :q_size].view(t, num_heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].view(t, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size:].view(t, num_kv_heads, head_dim)
    if q_norm is not None:
        q, k = q_norm * _normed(q, eps), k_norm * _normed(k, eps)
    half = head_dim // 2
    cos, sin = rope[positions, :half].unsqueeze(1), rope[positions, half:].unsqueeze(1)

    def rotate(x):
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    k_cache.index_copy_(0, slot_mapping, rotate(k))
    v_cache.index_copy_(0, slot_mapping, v)
    qkv[:, :q_size] = rotate(q).reshape(t, q_size)
    return qkv[:, :q_size].view(t, num_heads, head_dim)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2 I] (gate | up) -> silu(gate) * up, [T, I]."""
    if gate_up.is_cuda:
        from dormant.engines.native.kernels.triton_ops import silu_and_mul_cuda

        return silu_and_mul_cuda(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
