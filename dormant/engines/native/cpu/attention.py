"""Paged attention for transformers models, registered as ``dormant_paged``.

The model is called with one ``AttentionMetadata`` as the kwarg ``dormant_attn``; transformers
passes it unchanged to this function in every layer. Each layer writes the step's K/V into
its cache at ``slot_mapping``, then:
  a step with any prompt tokens (``is_prefill``; decodes may ride along, q_len 1): SDPA per
           sequence, causal over its own new tokens when they are its whole context, else
           over its context gathered from the cache (cached prefix or earlier chunks + the
           new tokens), the query aligned to the end of the context;
  a pure decode step: each sequence's K/V gathered through its block table into a padded
           [B, L] batch, one batched SDPA with a length mask.
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
    is_prefill: bool  # False: every sequence decodes one token
    slot_mapping: torch.Tensor  # [T] flat cache slot of every input token
    cu_seqlens: list[int]  # prefill: token boundaries of each sequence in the packed batch
    context_slots: list[torch.Tensor | None] | None = None  # prefill: slots of a sequence's whole context, None when it is only the new tokens
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
        # One dtype for Q, K and V: bf16 linears hand V over in bf16 while RoPE promotes Q and K
        # to fp32 (a 1-token prompt failed here when prompts could run the bf16 copies).
        value = value.to(query.dtype)
        key = key.to(query.dtype)
        outs = []
        bounds = meta.cu_seqlens
        contexts = meta.context_slots or [None] * (len(bounds) - 1)
        for start, end, slots in zip(bounds[:-1], bounds[1:], contexts):
            if slots is None:
                outs.append(F.scaled_dot_product_attention(
                    query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                    is_causal=True, scale=scaling, enable_gqa=True,
                ))
                continue
            ctx_k = k_cache[slots].transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
            ctx_v = v_cache[slots].transpose(0, 1).unsqueeze(0)
            mask = causal_mask_lower_right(end - start, slots.numel())
            outs.append(F.scaled_dot_product_attention(
                query[:, :, start:end].to(ctx_k.dtype), ctx_k, ctx_v, attn_mask=mask, scale=scaling,
                enable_gqa=True,
            ).to(query.dtype))
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


def causal_mask_lower_right(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """[q_len, kv_len], True where query i (the (kv_len - q_len + i)-th token) may look."""
    rows = torch.arange(q_len, device=device).unsqueeze(1) + (kv_len - q_len)
    return torch.arange(kv_len, device=device).unsqueeze(0) <= rows


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
