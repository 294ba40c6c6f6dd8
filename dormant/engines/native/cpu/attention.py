"""Paged attention for transformers models, registered as ``dormant_paged``.

The model is called with one ``AttentionMetadata`` as the kwarg ``dormant_attn``; transformers
passes it unchanged to this function in every layer. Each layer writes the step's K/V into
its cache at ``slot_mapping``, then:
  a step with any prompt tokens (``is_prefill``; decodes may ride along, q_len 1): SDPA per
           sequence over its whole context read back from the cache (cached prefix, earlier
           chunks and the new tokens alike), the query aligned to the end of the context;
  a pure decode step: each sequence's K/V gathered through its block table into a padded
           [B, L] batch, one batched SDPA with a length mask.

A prompt's numbers must not depend on how much of it came from the prefix cache (issue 11).
MKL's fp32 GEMM gives a row other bits when the matrix has few rows (1-3, 5-7 and 9-11 of
them on our EPYC; 4, 8 and 12 or more agree with one another), and SDPA's CPU kernel runs its
queries in blocks of 32/64/256 whose last block can be that small. So a step's tokens and each
sequence's queries run as whole tiles of ``ROW_TILE`` rows (padding discarded), and every
prompt reads K/V as stored, through one computation whether or not its head was cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTN_IMPLEMENTATION = "dormant_paged"
METADATA_KWARG = "dormant_attn"
ROW_TILE = 16  # prompt steps' GEMMs run on a multiple of this many rows (see above)


def padded_rows(num_rows: int) -> int:
    return num_rows + (-num_rows % ROW_TILE)


@dataclass
class AttentionMetadata:
    is_prefill: bool  # False: every sequence decodes one token
    slot_mapping: torch.Tensor  # [T] flat cache slot of every input token
    cu_seqlens: list[int]  # prefill: token boundaries of each sequence in the packed batch (rows past the last are padding)
    context_slots: list[torch.Tensor] | None = None  # prefill: slots of each sequence's whole context, new tokens last
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
    num_tokens = meta.slot_mapping.numel()  # a prompt step's rows past these are padding
    k = key[0, :, :num_tokens].transpose(0, 1)  # [T, Hkv, D]
    v = value[0, :, :num_tokens].transpose(0, 1)
    k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))

    if meta.is_prefill:
        bounds = meta.cu_seqlens
        outs = [prompt_attention(query[:, :, start:end], k_cache, v_cache, slots, scaling)
                for start, end, slots in zip(bounds[:-1], bounds[1:], meta.context_slots)]
        padding = query.shape[2] - num_tokens
        if padding:
            outs.append(outs[0].new_zeros(1, query.shape[1], padding, query.shape[3]))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # [1, H, T, D]
        return out.to(query.dtype).transpose(1, 2), None

    # decode: T == B, one new token per sequence
    gathered_k = k_cache[meta.gather_slots].transpose(1, 2)  # [B, Hkv, L, D]
    gathered_v = v_cache[meta.gather_slots].transpose(1, 2)
    q = query[0].transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
    out = F.scaled_dot_product_attention(
        q.to(gathered_k.dtype), gathered_k, gathered_v, attn_mask=meta.decode_mask, scale=scaling, enable_gqa=True
    )  # [B, H, 1, D]
    return out.to(query.dtype).transpose(1, 2).transpose(0, 1), None  # [1, B, H, D]


def prompt_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     scaling: float | None) -> torch.Tensor:
    """One sequence's queries [1, H, q, D], the last q of its context, over the context's K/V
    read from the cache at `slots` (so they are exactly what a later cache hit reads); the
    queries padded to whole tiles. Returns [1, H, q, D] in the cache's dtype."""
    q_len, kv_len = query.shape[2], slots.numel()
    padding = padded_rows(q_len) - q_len
    ctx_k = k_cache[slots].transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
    ctx_v = v_cache[slots].transpose(0, 1).unsqueeze(0)
    q = F.pad(query.to(ctx_k.dtype), (0, 0, 0, padding))
    if q_len == kv_len:
        # The same mask as below, but the kernel skips the blocks above the diagonal (half the
        # work at 2000 tokens) and gives the same bits (measured, blocks of 16 rows or more).
        out = F.scaled_dot_product_attention(q, ctx_k, ctx_v, is_causal=True, scale=scaling, enable_gqa=True)
    else:
        mask = F.pad(causal_mask_lower_right(q_len, kv_len), (0, 0, 0, padding), value=True)
        out = F.scaled_dot_product_attention(q, ctx_k, ctx_v, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out[:, :, :q_len]


def causal_mask_lower_right(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """[q_len, kv_len], True where query i (the (kv_len - q_len + i)-th token) may look."""
    rows = torch.arange(q_len, device=device).unsqueeze(1) + (kv_len - q_len)
    return torch.arange(kv_len, device=device).unsqueeze(0) <= rows


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
