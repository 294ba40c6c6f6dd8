"""Triton kernels and the pinned buffer against their references, on a GPU."""

from __future__ import annotations

import ctypes

import pytest
import torch


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
