"""Paged attention on the GPU, registered in transformers as ``dormant_paged_gpu``.

Like attention.py (the CPU path) the model gets one metadata object as the kwarg
``dormant_attn``; each layer writes the step's K/V at ``slot_mapping``, then
  prefill: causal SDPA per sequence over its own packed tokens (no prefix reuse yet);
  decode:  the Triton paged kernel over the block table (triton_attention.py), or, with
           ``decode_backend="sdpa"``, K/V gathered into a padded batch and one masked SDPA
           (a slow fallback, kept as the reference the kernel is checked against).
Decode does no host sync and only reads static-shaped tensors, so it can be captured in a
CUDA graph (cuda_graphs.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from dormant.engines.native.attention import METADATA_KWARG

GPU_ATTN_IMPLEMENTATION = "dormant_paged_gpu"


@dataclass
class GPUAttentionMetadata:
    is_prefill: bool
    slot_mapping: torch.Tensor  # [T] int64 flat cache slot of every input token
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, [slots, Hkv, D]
    block_size: int
    cu_seqlens: list[int] | None = None  # prefill: token boundaries in the packed batch
    block_tables: torch.Tensor | None = None  # decode: [B, max_blocks] int32
    context_lens: torch.Tensor | None = None  # decode: [B] int32 (the new token included)
    decode_backend: str = "triton"


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
        outs = []
        bounds = meta.cu_seqlens
        for start, end in zip(bounds[:-1], bounds[1:]):
            outs.append(F.scaled_dot_product_attention(
                query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                is_causal=True, scale=scaling, enable_gqa=True,
            ))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # [1, H, T, D]
        return out.transpose(1, 2), None

    q = query[0].transpose(0, 1)  # [B, H, D]
    if meta.decode_backend == "triton":
        from dormant.engines.native.triton_attention import paged_decode_attention

        out = paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                     scaling, meta.block_size)
    else:
        out = gather_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                      scaling, meta.block_size)
    return out.unsqueeze(0), None  # [1, B, H, D]


AttentionInterface.register(GPU_ATTN_IMPLEMENTATION, paged_attention_gpu)
