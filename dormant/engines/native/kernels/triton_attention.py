"""Paged decode attention in Triton: one query token per sequence, K/V read through the
block table, GQA aware (the query heads of one KV head share every K/V load).

Grid: (sequence, KV head). Each program walks its sequence's context BLOCK_N tokens at a
time (several KV blocks per step, gathered through the block table), with an online softmax
in fp32. The query group is padded to 16 rows so both products run on the tensor cores;
decode is bound by the bytes of K/V read, not by the wasted rows.

Imports triton at module level: only the CUDA path imports this module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr,
    scale,
    stride_qb, stride_qh,
    stride_ks, stride_kh,
    stride_bt,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)

    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    row_mask = rows < GROUP
    heads = kv_head * GROUP + rows
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=row_mask[:, None], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)

    for start in range(0, context_len, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pos_mask = pos < context_len
        block = tl.load(block_tables_ptr + seq * stride_bt + pos // BLOCK_SIZE, mask=pos_mask, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        kv_offsets = slot[:, None] * stride_ks + kv_head * stride_kh + dims[None, :]
        k = tl.load(k_cache_ptr + kv_offsets, mask=pos_mask[:, None], other=0.0)
        v = tl.load(v_cache_ptr + kv_offsets, mask=pos_mask[:, None], other=0.0)

        s = tl.dot(q, tl.trans(k)) * scale  # [GROUP_PAD, BLOCK_N] fp32
        s = tl.where(pos_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [slots, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32, >= 1
    scale: float,
    block_size: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty((batch, num_heads, head_dim), dtype=q.dtype, device=q.device)
    block_n = max(64, block_size)
    _paged_decode_kernel[(batch, num_kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out,
        scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=block_n,
        num_warps=4, num_stages=2,
    )
    return out


@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, positions_ptr,
    qb_row_ptr, qb_start_ptr, qb_end_ptr, out_ptr,
    scale,
    stride_qt, stride_qh,
    stride_ks, stride_kh,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    qb = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    table_row = tl.load(qb_row_ptr + qb)
    start = tl.load(qb_start_ptr + qb)
    end = tl.load(qb_end_ptr + qb)
    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    q_pos = tl.load(positions_ptr + rows, mask=row_mask, other=0)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + dims[None, :], mask=row_mask[:, None], other=0.0)
    context_len = tl.max(q_pos, 0) + 1

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for kv_start in range(0, context_len, BLOCK_N):
        pos = kv_start + tl.arange(0, BLOCK_N)
        pos_mask = pos < context_len
        block = tl.load(block_tables_ptr + table_row * stride_bt + pos // BLOCK_SIZE, mask=pos_mask, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        kv_offsets = slot[:, None] * stride_ks + kv_head * stride_kh + dims[None, :]
        k = tl.load(k_cache_ptr + kv_offsets, mask=pos_mask[:, None], other=0.0)
        v = tl.load(v_cache_ptr + kv_offsets, mask=pos_mask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(pos[None, :] <= q_pos[:, None], s, float("-inf"))  # causal; masked rows see position 0
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def paged_prefill_attention(
    q: torch.Tensor,  # [T, H, D] (a view may have a row stride)
    k_cache: torch.Tensor,  # [slots, Hkv, D], the step's K/V already written
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks] int32
    positions: torch.Tensor,  # [T] position of every query row
    query_blocks: tuple[torch.Tensor, torch.Tensor, torch.Tensor],  # per block: table row, first row, end row
    scale: float,
    block_size: int,
    out: torch.Tensor,  # [T, H, D]
    block_m: int,
) -> torch.Tensor:
    """Causal attention of every prompt row over its sequence's cache up to its own position,
    all sequences of a step in one launch: grid (query block of <= block_m rows of one
    sequence, query head). A cached prefix or earlier chunks are just cache positions."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    group = num_heads // k_cache.shape[1]
    rows, starts, ends = query_blocks
    _paged_prefill_kernel[(rows.numel(), num_heads)](
        q, k_cache, v_cache, block_tables, positions, rows, starts, ends, out,
        scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=64,
        num_warps=4, num_stages=2,
    )
    return out
