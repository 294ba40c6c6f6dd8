"""Paged attention for transformers models, registered as ``dormant_paged``.

The model is called with one ``AttentionMetadata`` as the kwarg ``dormant_attn``; transformers
passes it unchanged to this function in every layer. Each layer writes the step's K/V into
its cache at ``slot_mapping``, then:
  prefill: causal SDPA per sequence over its own tokens (no prefix caching);
  decode:  each sequence's K/V gathered through its block table into a padded [B, L] batch,
           one batched SDPA with a length mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTN_IMPLEMENTATION = "dormant_paged"
METADATA_KWARG = "dormant_attn"


@dataclass
class AttentionMetadata:
    is_prefill: bool
    slot_mapping: torch.Tensor  # [T] flat cache slot of every input token
    cu_seqlens: list[int]  # prefill: token boundaries of each sequence in the packed batch
    gather_slots: torch.Tensor | None = None  # decode: [B, L] slots of each sequence's context
    decode_mask: torch.Tensor | None = None  # decode: [B, 1, 1, L] True where a position is valid
    context_lens: torch.Tensor | None = None  # decode: [B]
    block_tables: torch.Tensor | None = None  # decode: [B, max_blocks] (for reference/debugging)
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer, flat [slots, Hkv, D]


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, H, T, D]
    key: torch.Tensor,  # [1, Hkv, T, D]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    meta: AttentionMetadata = kwargs[METADATA_KWARG]
    k_cache, v_cache = meta.kv_caches[module.layer_idx]
    k = key[0].transpose(0, 1)  # [T, Hkv, D]
    v = value[0].transpose(0, 1)
    k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))

    if meta.is_prefill:
        # A prompt of <= small_batch_tokens runs the mixed mode's bf16 linears: V comes out
        # bf16 while RoPE has promoted Q and K to fp32 (a 1-token prompt failed here).
        value = value.to(query.dtype)
        key = key.to(query.dtype)
        outs = []
        bounds = meta.cu_seqlens
        for start, end in zip(bounds[:-1], bounds[1:]):
            outs.append(
                F.scaled_dot_product_attention(
                    query[:, :, start:end],
                    key[:, :, start:end],
                    value[:, :, start:end],
                    is_causal=True,
                    scale=scaling,
                    enable_gqa=True,
                )
            )
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # [1, H, T, D]
        return out.transpose(1, 2), None

    # decode: T == B, one new token per sequence
    gathered_k = k_cache[meta.gather_slots].transpose(1, 2)  # [B, Hkv, L, D]
    gathered_v = v_cache[meta.gather_slots].transpose(1, 2)
    q = query[0].transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
    out = F.scaled_dot_product_attention(
        q.to(gathered_k.dtype), gathered_k, gathered_v, attn_mask=meta.decode_mask, scale=scaling, enable_gqa=True
    )  # [B, H, 1, D]
    return out.to(query.dtype).transpose(1, 2).transpose(0, 1), None  # [1, B, H, D]


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
