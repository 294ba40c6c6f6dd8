"""Paged attention on the GPU, registered in transformers as ``dormant_paged_gpu``.

Like cpu/attention.py the model gets one metadata object as the kwarg
``dormant_attn``; each layer writes the step's K/V at ``slot_mapping``, then
  a packed step (``is_prefill``): the first ``num_decodes`` rows are decodes, run by the
           Triton paged kernel in one launch; then per prompt chunk one SDPA, causal over its
           own tokens when they are its whole context, else over its context gathered from
           the cache (cached prefix / earlier chunks + new tokens), aligned to the end;
  a pure decode step: the Triton paged kernel over the block table (kernels/triton_attention.py),
           or, with ``decode_backend="sdpa"``, K/V gathered into a padded batch and one masked
           SDPA (a slow fallback, kept as the reference the kernel is checked against).
Decode does no host sync and only reads static-shaped tensors, so it can be captured in a
CUDA graph (graphs.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from dormant.engines.native.cpu.attention import METADATA_KWARG, causal_mask_lower_right

GPU_ATTN_IMPLEMENTATION = "dormant_paged_gpu"
PREFILL_BLOCK_M = 64  # query rows per program of the varlen prefill kernel (compact decoder)


@dataclass
class GPUAttentionMetadata:
    is_prefill: bool
    slot_mapping: torch.Tensor  # [T] int64 flat cache slot of every input token
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, [slots, Hkv, D]
    block_size: int
    cu_seqlens: list[int] | None = None  # packed: prompt-chunk boundaries (after the decode rows)
    context_slots: list[torch.Tensor | None] | None = None  # packed: per chunk, its whole context's slots, None when only new tokens
    num_decodes: int = 0  # packed: leading rows that decode one token (block_tables/context_lens are theirs)
    block_tables: torch.Tensor | None = None  # decode rows first, then (packed) each prompt chunk's seq: [S, max_blocks] int32
    context_lens: torch.Tensor | None = None  # decode rows: [B] (the new token included)
    decode_backend: str = "triton"
    # packed, compact decoder: per query block of <= PREFILL_BLOCK_M prompt rows of one seq,
    # its block_tables row, first row and end row
    prefill_blocks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def gather_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, block_size):
    """Reference decode: gather each sequence's K/V to [B, L] and run one masked SDPA."""
    max_len = block_tables.shape[1] * block_size
    pos = torch.arange(max_len, device=q.device)
    slots = block_tables[:, pos // block_size].long() * block_size + pos % block_size  # [B, L]
    k = k_cache[slots].transpose(1, 2)  # [B, Hkv, L, D]
    v = v_cache[slots].transpose(1, 2)
    mask = (pos[None, :] < context_lens[:, None].long()).view(q.shape[0], 1, 1, max_len)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(2)  # [B, H, D]


def paged_attention_gpu(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, H, T, D]
    key: torch.Tensor,  # [1, Hkv, T, D]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    meta: GPUAttentionMetadata = kwargs[METADATA_KWARG]
    k_cache, v_cache = meta.kv_caches[module.layer_idx]
    k_cache.index_copy_(0, meta.slot_mapping, key[0].transpose(0, 1))
    v_cache.index_copy_(0, meta.slot_mapping, value[0].transpose(0, 1))
    if scaling is None:
        scaling = query.shape[-1] ** -0.5

    if meta.is_prefill:
        parts = []
        nd = meta.num_decodes
        if nd:
            parts.append(_decode(query[0, :, :nd].transpose(0, 1), k_cache, v_cache, meta, scaling))
        bounds = meta.cu_seqlens
        for start, end, slots in zip(bounds[:-1], bounds[1:], meta.context_slots):
            if slots is None:
                out = F.scaled_dot_product_attention(
                    query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                    is_causal=True, scale=scaling, enable_gqa=True)
            else:
                ctx_k = k_cache[slots].transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
                ctx_v = v_cache[slots].transpose(0, 1).unsqueeze(0)
                mask = causal_mask_lower_right(end - start, slots.numel(), device=query.device)
                out = F.scaled_dot_product_attention(query[:, :, start:end], ctx_k, ctx_v, attn_mask=mask,
                                                     scale=scaling, enable_gqa=True)
            parts.append(out[0].transpose(0, 1))  # [q, H, D]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return out.unsqueeze(0), None  # [1, T, H, D]

    return _decode(query[0].transpose(0, 1), k_cache, v_cache, meta, scaling).unsqueeze(0), None  # [1, B, H, D]


def _decode(q, k_cache, v_cache, meta: GPUAttentionMetadata, scaling: float) -> torch.Tensor:
    """q [B, H, D] -> [B, H, D], one new token per sequence."""
    tables, lens = meta.block_tables[:q.shape[0]], meta.context_lens[:q.shape[0]]  # packed: prompt rows follow
    if meta.decode_backend == "triton":
        from dormant.engines.native.kernels.triton_attention import paged_decode_attention

        return paged_decode_attention(q, k_cache, v_cache, tables, lens, scaling, meta.block_size)
    return gather_decode_attention(q, k_cache, v_cache, tables, lens, scaling, meta.block_size)


AttentionInterface.register(GPU_ATTN_IMPLEMENTATION, paged_attention_gpu)
