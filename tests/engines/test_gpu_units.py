"""The GPU engine's pieces that need no GPU: graph batch-size padding, KV sizing, the
sampler (run on CPU tensors), the device switch in EngineConfig."""

from __future__ import annotations

import ctypes
import json
from types import SimpleNamespace

import pytest
import torch

from dormant.engines.native.core.config import EngineConfig
from dormant.engines.native.cuda.graphs import graph_batch_sizes, padded_batch_size
from dormant.engines.native.cuda.start import (
    GiB, activation_reserve_bytes, kv_block_bytes, num_kv_blocks_for_memory,
)
from dormant.engines.base import SamplingParams
from dormant.engines.native.core.sequence import Sequence
from dormant.engines.native.cuda.sampler import GPUSampler, top_p_filter


def test_graph_sizes_default_up_to_max_num_seqs_and_include_it():
    assert graph_batch_sizes(None, 128) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128]
    assert graph_batch_sizes(None, 20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes([64, 1, 8, 8, 500], 128) == [1, 8, 64]
    assert graph_batch_sizes([], 128) == []


def test_padded_batch_size_picks_the_smallest_graph_that_fits():
    sizes = [1, 2, 4, 8, 16, 32]
    assert [padded_batch_size(n, sizes) for n in (1, 2, 3, 5, 8, 9, 32)] == [1, 2, 4, 8, 8, 16, 32]
    assert padded_batch_size(33, sizes) is None  # larger than any graph: eager
    assert padded_batch_size(1, []) is None


def test_decode_graphs_defer_the_large_sizes_and_offer_only_captured_ones(monkeypatch):
    from dormant.engines.native.cuda import graphs as cuda_graphs

    captured = []
    monkeypatch.setattr(cuda_graphs.DecodeGraphs, "_capture",
                        lambda self, size: (captured.append(size), self._graphs.__setitem__(size, (None, size)),
                                            setattr(self, "sizes", sorted(self._graphs))))
    g = cuda_graphs.DecodeGraphs(lambda n: None, [1, 2, 4, 8, 16, 32, 64], defer_above=8)
    assert captured == [8, 4, 2, 1] and g.sizes == [1, 2, 4, 8] and g.pending == [64, 32, 16]
    assert g.padded_size(3) == 4 and g.padded_size(9) is None  # not captured yet: eager
    assert g.capture_next() and captured[-1] == 64 and g.padded_size(9) == 64
    assert g.capture_next() and not g.capture_next() and not g.capture_next()
    assert g.sizes == [1, 2, 4, 8, 16, 32, 64] and g.padded_size(9) == 16
    assert cuda_graphs.DecodeGraphs(lambda n: None, [1, 2], defer_above=8).pending == []
    assert cuda_graphs.DecodeGraphs(lambda n: None, [4, 16]).pending == []  # no deferral


def test_decode_graphs_capture_ascending_until_told_to_stop_then_on_demand(monkeypatch):
    """stop_when (the runner's "weights have landed"): ascending, at least the smallest; a
    step that needs a pending size captures that one."""
    from dormant.engines.native.cuda import graphs as cuda_graphs

    captured = []
    monkeypatch.setattr(cuda_graphs.DecodeGraphs, "_capture",
                        lambda self, size: (captured.append(size), self._graphs.__setitem__(size, (None, size)),
                                            setattr(self, "sizes", sorted(self._graphs))))
    landed_after = iter([False, False, True])
    g = cuda_graphs.DecodeGraphs(lambda n: None, [1, 2, 4, 8, 16], stop_when=lambda: next(landed_after))
    assert captured == [1, 2, 4] and g.pending == [16, 8]
    assert g.padded_size(5) is None and g.wanted_size(5) == 8 and g.wanted_size(17) is None
    g.capture(8)
    assert g.padded_size(5) == 8 and g.pending == [16] and captured[-1] == 8
    with pytest.raises(ValueError):
        g.capture(8)  # not pending any more
    captured.clear()
    assert cuda_graphs.DecodeGraphs(lambda n: None, [1, 2, 4], stop_when=lambda: True).sizes == [1]
    assert captured == [1]  # landed before the first: the smallest all the same


class _IdleEngine:
    """Just enough of LLMEngine for AsyncLLMEngine's loop: one request of `steps` steps."""

    def __init__(self, idle_work):
        self.model_runner = SimpleNamespace(idle_work=idle_work, sleep_levels=(1, 2), image_dir=None)
        self.steps_left = 0
        self.is_sleeping = False
        self.log: list[str] = []

    @property
    def has_unfinished(self):
        return self.steps_left > 0

    def add_request(self, request_id, prompt, params):
        self.steps_left = 3

    def step(self):
        self.log.append("step")
        self.steps_left -= 1
        return [("r", [7], self.steps_left == 0, "length" if self.steps_left == 0 else None)]


def test_async_engine_runs_idle_work_only_between_requests():
    import asyncio
    import time

    from dormant.engines.native.core.async_engine import AsyncLLMEngine

    units = iter([0.05, 0.0, 0.0, None])  # a wait, two units of work, then done

    def idle_work():
        engine.log.append("idle")
        return next(units, None)

    engine = _IdleEngine(idle_work)
    a = AsyncLLMEngine(engine)
    try:
        async def go():
            return [item async for item in a.generate("r", [1, 2], SamplingParams(max_tokens=3))]

        out = asyncio.run(go())
        assert [i[0] for i in out] == [[7], [7], [7]]
        deadline = time.monotonic() + 5
        while engine.log.count("idle") < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        log = engine.log
        first_step = log.index("step")
        assert log[first_step:first_step + 3] == ["step"] * 3  # never between a request's steps
        assert log.count("idle") == 4  # after None: not called again while nothing happens
    finally:
        a.shutdown()


def test_async_engine_drops_idle_work_that_raises():
    import time

    from dormant.engines.native.core.async_engine import AsyncLLMEngine

    calls = []

    def idle_work():
        calls.append(1)
        raise RuntimeError("boom")

    engine = _IdleEngine(idle_work)
    a = AsyncLLMEngine(engine)
    try:
        fut = a._submit(lambda: None)  # a command: the loop asks for idle work after it
        fut.result(timeout=5)
        time.sleep(0.1)
        a._submit(lambda: None).result(timeout=5)
        time.sleep(0.1)
        assert calls == [1]
    finally:
        a.shutdown()


def test_kv_block_bytes_qwen3_8b():
    # 36 layers, 8 KV heads of 128, bf16, K and V: 144 KiB per token
    assert kv_block_bytes(36, 16, 8, 128, 2) == 16 * 36 * 2 * 8 * 128 * 2


def test_kv_blocks_fill_the_utilization_after_weights_others_and_reserve():
    total, free = 80 * GiB, 79 * GiB  # 1 GiB held by the context
    block = 2 * 1024 * 1024
    n = num_kv_blocks_for_memory(total, free, 0.9, weights_bytes=16 * GiB, reserve_bytes=2 * GiB, block_bytes=block)
    assert n == (int(80 * GiB * 0.9) - 1 * GiB - 16 * GiB - 2 * GiB) // block
    assert num_kv_blocks_for_memory(total, 10 * GiB, 0.9, 16 * GiB, 2 * GiB, block) == 0  # nothing fits


def test_activation_reserve_grows_with_the_token_budget():
    cfg = SimpleNamespace(hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=128, vocab_size=151936)
    small = activation_reserve_bytes(cfg, 512, 8)
    large = activation_reserve_bytes(cfg, 8192, 128)
    assert GiB // 2 < small < large < 8 * GiB


def _seq(i: int, **params) -> Sequence:
    return Sequence(f"r{i}", [1, 2, 3], SamplingParams(**params))


def test_sampler_greedy_rows_take_the_argmax():
    logits = torch.randn(3, 50)
    assert GPUSampler()(logits, [_seq(i, temperature=0) for i in range(3)]) == logits.argmax(-1).tolist()


def test_sampler_seed_reproduces_whatever_else_is_batched():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    sampler = GPUSampler()
    alone = sampler(logits[1:2], [_seq(0, temperature=1.0, seed=7)])
    seq = _seq(0, temperature=1.0, seed=7)
    batched = sampler(logits, [_seq(1, temperature=0), seq, _seq(2, temperature=0.7), _seq(3, temperature=1.0, seed=1)])
    assert batched[1] == alone[0]
    assert batched[0] == int(logits[0].argmax())


def test_sampler_follows_the_distribution_and_top_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4).contiguous()
    seqs = [_seq(i, temperature=1.0) for i in range(4000)]
    counts = torch.bincount(torch.tensor(GPUSampler()(logits, seqs)), minlength=4).float() / 4000
    assert torch.allclose(counts, probs, atol=0.04)
    seqs = [_seq(i, temperature=1.0, top_p=0.7) for i in range(4000)]
    counts = torch.bincount(torch.tensor(GPUSampler()(logits, seqs)), minlength=4)
    assert counts[2] == 0 and counts[3] == 0 and counts[0] > counts[1] > 0


def test_top_p_filter_per_row():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    out = top_p_filter(probs, torch.tensor([[0.5], [0.9]]))
    assert torch.equal(out, torch.tensor([[0.5, 0.0, 0.0], [0.5, 0.3, 0.2]]))


@pytest.fixture()
def config_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 40960}))
    return tmp_path


def test_config_cuda_defaults_leave_kv_to_the_runner(config_dir):
    c = EngineConfig.from_args(config_dir, {"device": "cuda"})
    assert (c.dtype, c.max_num_seqs, c.num_kv_blocks, c.max_model_len) == ("bfloat16", 128, None, 8192)
    c.set_num_kv_blocks(100)  # 1600 tokens: max_model_len shrinks to fit
    assert c.max_model_len == 1600


def test_config_cpu_defaults_unchanged(config_dir):
    c = EngineConfig.from_args(config_dir, {"device": "cpu"})
    assert (c.dtype, c.max_num_seqs, c.num_kv_blocks) == ("mixed", 8, 512)


@pytest.mark.parametrize("args, key", [
    ({"device": "tpu"}, "device"),
    ({"device": "cuda", "dtype": "mixed"}, "dtype"),
    ({"device": "cuda", "gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ({"device": "cuda", "decode_attention": "flash"}, "decode_attention"),
])
def test_config_bad_gpu_args_name_the_key(config_dir, args, key):
    with pytest.raises(ValueError, match=key):
        EngineConfig.from_args(config_dir, args)


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
