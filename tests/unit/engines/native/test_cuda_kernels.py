"""The CUDA wing's attention and fused RMS norm against references on the CPU; prepare() and the CUDA context."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


def test_packed_gpu_attention_matches_per_sequence_sdpa():
    """The packed step of cuda/attention.py (decode rows + whole prompts + chunks over a cached
    context), run on CPU with the gather backend, against plain causal SDPA per sequence."""
    import torch.nn.functional as F

    from dormant.engines.native.cuda.attention import GPUAttentionMetadata, paged_attention_gpu

    torch.manual_seed(0)
    heads, kv_heads, d, bs, num_blocks = 4, 2, 16, 4, 64
    k_cache = torch.zeros(num_blocks * bs, kv_heads, d)
    v_cache = torch.zeros_like(k_cache)
    # (context length, new tokens): two decodes, a whole prompt, a chunk after 9 computed tokens
    shapes = [(7, 1), (12, 1), (6, 6), (14, 5)]
    perm = torch.randperm(num_blocks).tolist()
    tables, full_k, full_v, full_q = [], [], [], []
    for ctx, _ in shapes:
        nb = -(-ctx // bs)
        tables.append([perm.pop() for _ in range(nb)])
        full_k.append(torch.randn(ctx, kv_heads, d))
        full_v.append(torch.randn(ctx, kv_heads, d))
        full_q.append(torch.randn(ctx, heads, d))
    slots_of = lambda t, ctx: torch.tensor([t[p // bs] * bs + p % bs for p in range(ctx)])  # noqa: E731
    for (ctx, new), t, k, v in zip(shapes, tables, full_k, full_v):  # earlier tokens already cached
        s = slots_of(t, ctx)[: ctx - new]
        k_cache[s], v_cache[s] = k[: ctx - new], v[: ctx - new]
    q = torch.cat([fq[ctx - new:] for (ctx, new), fq in zip(shapes, full_q)])  # [T, H, D]
    k = torch.cat([fk[ctx - new:] for (ctx, new), fk in zip(shapes, full_k)])
    v = torch.cat([fv[ctx - new:] for (ctx, new), fv in zip(shapes, full_v)])
    slot_mapping = torch.cat([slots_of(t, ctx)[ctx - new:] for (ctx, new), t in zip(shapes, tables)])
    width = max(len(t) for t in tables[:2])
    meta = GPUAttentionMetadata(
        is_prefill=True, slot_mapping=slot_mapping, kv_caches=[(k_cache, v_cache)], block_size=bs,
        cu_seqlens=[2, 8, 13], num_decodes=2,
        context_slots=[None, slots_of(tables[3], 14)],
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables[:2]], dtype=torch.int32),
        context_lens=torch.tensor([7, 12]), decode_backend="sdpa",
    )
    module = SimpleNamespace(layer_idx=0)
    out, _ = paged_attention_gpu(module, q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                 v.transpose(0, 1).unsqueeze(0), None, scaling=d ** -0.5,
                                 **{"dormant_attn": meta})
    refs = []
    for (ctx, new), fq, fk, fv in zip(shapes, full_q, full_k, full_v):
        ref = F.scaled_dot_product_attention(fq.transpose(0, 1), fk.transpose(0, 1), fv.transpose(0, 1),
                                             is_causal=True, scale=d ** -0.5, enable_gqa=True)  # [H, ctx, D]
        refs.append(ref.transpose(0, 1)[ctx - new:])
    torch.testing.assert_close(out[0], torch.cat(refs), atol=1e-5, rtol=1e-4)


def test_fused_rms_norm_matches_transformers():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from dormant.engines.native.cuda.start import fuse_rms_norms

    norm = Qwen3RMSNorm(64, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 5, 64)
    ref = norm(x)
    model = torch.nn.Sequential(norm)
    assert fuse_rms_norms(model) == 1
    torch.testing.assert_close(model(x), ref)


def test_prepare_starts_the_cuda_context_only_where_there_may_be_a_gpu(monkeypatch):
    from dormant.engines.base import get_engine
    from dormant.engines.native.cuda import start as cuda_start

    calls = []
    monkeypatch.setattr(cuda_start, "start_cuda_context", lambda: calls.append("context"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("prepare must not pay for cuInit"))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    prepare = get_engine("native").prepare
    prepare({"device": "cpu"})
    assert calls == []
    prepare({})  # device auto, a CUDA build of torch
    prepare({"device": "cuda"})
    assert calls == ["context", "context"]
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build: no GPU to prepare for
    prepare({})
    assert calls == ["context", "context"]
