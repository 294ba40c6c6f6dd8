"""The GPU engine's kernels and CUDA plumbing: packed attention and the fused RMS norm (on CPU),
the Triton kernels and the pinned buffer (on a GPU only), and where prepare starts a CUDA
context."""

from __future__ import annotations

import ctypes
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_fused_ops_match_their_torch_references():
    from dormant.engines.native.kernels import fused_ops

    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    x, r = torch.randn(5, 4096, device=dev, dtype=bf16), torch.randn(5, 4096, device=dev, dtype=bf16)
    w = (1 + 0.1 * torch.randn(4096, device=dev)).to(bf16)
    for res in (r, None):
        out, res_out = fused_ops.add_rms_norm(x, res, w, 1e-6)
        ref, ref_res = fused_ops.add_rms_norm(x.cpu(), None if res is None else res.cpu(), w.cpu(), 1e-6)
        torch.testing.assert_close(res_out.cpu(), ref_res)
        torch.testing.assert_close(out.cpu(), ref, rtol=2e-2, atol=2e-2)
    gu = torch.randn(3, 2 * 3000, device=dev, dtype=bf16)
    torch.testing.assert_close(fused_ops.silu_and_mul(gu).cpu(), fused_ops.silu_and_mul(gu.cpu()), rtol=2e-2, atol=2e-2)

    heads, kv_heads, d, t = 8, 2, 128, 6
    for norm in (True, False):
        qkv = torch.randn(t, (heads + 2 * kv_heads) * d, device=dev, dtype=bf16)
        pos = torch.tensor([0, 1, 5, 17, 100, 3], device=dev)
        rope = torch.randn(128, d, device=dev, dtype=bf16)
        qn, kn = ((1 + 0.1 * torch.randn(d, device=dev)).to(bf16) for _ in range(2)) if norm else (None, None)
        slots = torch.tensor([9, 3, 4, 0, 31, 12], device=dev)
        caches = [torch.zeros(32, kv_heads, d, device=dev, dtype=bf16) for _ in range(2)]
        ref_caches = [c.cpu() for c in caches]
        ref_qkv = qkv.cpu()
        q = fused_ops.qk_norm_rope_cache(qkv, pos, rope, qn, kn, 1e-6, *caches, slots, heads, kv_heads, d)
        ref_q = fused_ops.qk_norm_rope_cache(ref_qkv, pos.cpu(), rope.cpu(), None if qn is None else qn.cpu(),
                                             None if kn is None else kn.cpu(), 1e-6, *ref_caches, slots.cpu(),
                                             heads, kv_heads, d)
        torch.testing.assert_close(q.cpu(), ref_q, rtol=2e-2, atol=2e-2)
        for c, ref_c in zip(caches, ref_caches):
            torch.testing.assert_close(c.cpu(), ref_c, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_prefill_kernel_matches_reference():
    from dormant.engines.native.cuda.attention import PREFILL_BLOCK_M, GPUAttentionMetadata
    from dormant.engines.native.cuda.compact_decoder import _prefill_reference
    from dormant.engines.native.kernels.triton_attention import paged_prefill_attention

    torch.manual_seed(0)
    bs, blocks, heads, kv_heads, d = 16, 256, 32, 8, 128
    k_cache = torch.randn(blocks * bs, kv_heads, d, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(blocks, device="cuda")[:3 * 64].view(3, 64).int()
    # (first position, rows): a whole prompt, a chunk after 300 cached tokens, a short one
    seqs = [(0, 130), (300, 77), (0, 3)]
    positions, qb = [], [[], [], []]
    for row, (first, n) in enumerate(seqs):
        for b in range(len(positions), len(positions) + n, PREFILL_BLOCK_M):
            for col, v in zip(qb, (row, b, min(b + PREFILL_BLOCK_M, len(positions) + n))):
                col.append(v)
        positions.extend(range(first, first + n))
    positions = torch.tensor(positions, device="cuda")
    query_blocks = tuple(torch.tensor(c, device="cuda") for c in qb)
    q = torch.randn(positions.numel(), heads, d, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    paged_prefill_attention(q, k_cache, v_cache, tables, positions, query_blocks, d ** -0.5, bs, out, PREFILL_BLOCK_M)
    meta = GPUAttentionMetadata(is_prefill=True, slot_mapping=None, kv_caches=[], block_size=bs,
                                block_tables=tables, prefill_blocks=query_blocks)
    ref = torch.empty(q.shape, dtype=torch.float32, device="cuda")
    _prefill_reference(q.float(), k_cache.float(), v_cache.float(), positions, meta, d ** -0.5, ref)
    err = (out.float() - ref).norm() / ref.norm()
    assert err < 1e-2, f"relative error {err:.2e}"


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pinned_buffer_is_page_aligned_and_freed_once():
    from dormant.engines.native.cuda.pinned import PinnedBuffer

    torch.empty(1, device="cuda")
    with PinnedBuffer(3 << 20) as buf:
        assert buf.address % 4096 == 0 and buf.nbytes == 3 << 20
        host = torch.frombuffer((ctypes.c_char * buf.nbytes).from_address(buf.address), dtype=torch.uint8)
        host.fill_(7)
        assert int(host.to("cuda").sum()) == 7 * (3 << 20)
    assert buf.address == 0
    buf.close()  # idempotent
    with pytest.raises(ValueError):
        PinnedBuffer(0)
