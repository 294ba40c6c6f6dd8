"""Block manager, scheduler and sampler, without a model."""

import pytest
import torch

from dormant.engines.base import SamplingParams
from dormant.engines.native.core.block_manager import BlockManager
from dormant.engines.native.core.scheduler import Scheduler
from dormant.engines.native.core.sequence import Sequence
from dormant.engines.native.cpu.sampler import Sampler, top_p_filter


def seq(rid, n, **params):
    return Sequence(rid, list(range(1, n + 1)), SamplingParams(temperature=0, **params))


@pytest.mark.timeout(10)
def test_block_manager_allocates_and_frees():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq("a", 5)
    assert bm.can_allocate(a)
    bm.allocate(a)
    assert len(a.block_table) == 2 and bm.num_free_blocks == 2
    for t in range(3):  # tokens 6..8 fit in block 2
        a.append_token(9)
        assert bm.can_append(a)
        bm.may_append(a)
    assert len(a.block_table) == 2
    a.append_token(9)  # token 9 needs a third block
    bm.may_append(a)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 1
    assert not bm.can_allocate(seq("b", 5))
    bm.free(a)
    assert bm.num_free_blocks == 4 and a.block_table == []


class _Cfg:
    max_num_seqs = 4
    max_num_batched_tokens = 64
    max_model_len = 64
    num_kv_blocks = 3
    block_size = 4
    enable_prefix_caching = False
    enable_chunked_prefill = True


def _cfg(**kw):
    cfg = _Cfg()
    cfg.__dict__.update(kw)
    return cfg


def step(sched, token_ids_of):
    """One scheduled step; token_ids_of(seq) gives the id sampled for a seq that samples."""
    seqs = sched.schedule()
    plan = [(s.request_id, s.num_scheduled_tokens) for s in seqs]
    outputs = sched.postprocess(seqs, [token_ids_of(s) for s in seqs if s.samples_this_step])
    return plan, [(rid, out.new_token_ids, out.finished, out.finish_reason) for rid, out in outputs]


@pytest.mark.timeout(10)
def test_scheduler_prefill_then_batched_decode_and_preemption():
    sched = Scheduler(_Cfg(), eos_token_ids={0})
    a, b = seq("a", 4, max_tokens=10), seq("b", 4, max_tokens=10)
    sched.add(a)
    sched.add(b)
    plan, _ = step(sched, lambda s: 7)
    assert plan == [("a", 4), ("b", 4)]  # one block each; both now need a second, one is free
    plan, out = step(sched, lambda s: 0)  # b, the most recent, is preempted; EOS finishes a
    assert plan == [("a", 1)] and out == [("a", [0], True, "stop")]
    assert list(sched.waiting) == [b] and b.block_table == []
    plan, _ = step(sched, lambda s: 7)
    assert plan == [("b", 5)]  # recomputed with its output so far


@pytest.mark.timeout(10)
def test_scheduler_mixes_decodes_with_prompt_chunks_under_the_budget():
    sched = Scheduler(_cfg(num_kv_blocks=16, max_num_batched_tokens=8), eos_token_ids={0})
    a, b = seq("a", 3, max_tokens=10), seq("b", 12, max_tokens=10)
    sched.add(a)
    plan, out = step(sched, lambda s: 7)
    assert plan == [("a", 3)] and out == [("a", [7], False, None)]
    sched.add(b)
    plan, out = step(sched, lambda s: 7)
    assert plan == [("a", 1), ("b", 4)]  # a decode and a chunk of b, cut at a block boundary
    assert [o[0] for o in out] == ["a"]  # b's chunk stops short of its last token: no sample
    plan, out = step(sched, lambda s: 7)
    assert plan == [("a", 1), ("b", 4)] and [o[0] for o in out] == ["a"]
    plan, out = step(sched, lambda s: 7)
    assert plan == [("a", 1), ("b", 4)] and [o[0] for o in out] == ["a", "b"]
    plan, _ = step(sched, lambda s: 7)
    assert plan == [("a", 1), ("b", 1)]


@pytest.mark.timeout(10)
def test_a_prompt_chunk_is_whole_blocks_or_waits():
    sched = Scheduler(_cfg(num_kv_blocks=32, max_num_batched_tokens=8, max_num_seqs=8), eos_token_ids={0})
    decoding = [seq(f"d{i}", 2, max_tokens=10) for i in range(6)]
    for s in decoding:
        sched.add(s)
    step(sched, lambda s: 7)  # four prompts of 2 fill the budget of 8
    step(sched, lambda s: 7)  # four decodes and the other two prompts
    long, short = seq("long", 7, max_tokens=10), seq("short", 2, max_tokens=10)
    sched.add(long)
    sched.add(short)
    plan, _ = step(sched, lambda s: 7)  # six decodes leave 2 tokens: less than a block of 4
    assert [rid for rid, _ in plan] == [s.request_id for s in decoding]  # long waits, short behind it
    for s in decoding[2:]:
        sched.abort(s.request_id)
    plan, _ = step(sched, lambda s: 7)  # two decodes leave 6: one block of long, then short whole
    assert plan == [("d0", 1), ("d1", 1), ("long", 4), ("short", 2)]
    plan, _ = step(sched, lambda s: 7)
    assert plan == [("d0", 1), ("d1", 1), ("long", 3), ("short", 1)]


@pytest.mark.timeout(10)
def test_scheduler_without_chunked_prefill_runs_whole_prompts_apart():
    sched = Scheduler(_cfg(num_kv_blocks=16, max_num_batched_tokens=8, enable_chunked_prefill=False), {0})
    a, b = seq("a", 3, max_tokens=10), seq("b", 12, max_tokens=10)
    sched.add(a)
    step(sched, lambda s: 7)
    sched.add(b)
    assert step(sched, lambda s: 7)[0] == [("b", 12)]  # the first prompt of a step may exceed the budget
    assert step(sched, lambda s: 7)[0] == [("a", 1), ("b", 1)]


@pytest.mark.timeout(10)
def test_block_manager_shares_cached_prefix_blocks_with_ref_counts():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = Sequence("a", list(range(1, 11)), SamplingParams())  # 10 tokens: blocks 0-1 full, 2 partial
    bm.allocate(a)
    assert a.num_computed_tokens == 0 and bm.num_free_blocks == 5
    a.num_computed_tokens = 10
    bm.cache_full_blocks(a)
    assert len(a.block_hashes) == 2
    b = Sequence("b", list(range(1, 10)) + [99], SamplingParams())  # same first 9 tokens
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_computed_tokens == b.num_cached_tokens == 8 and bm.num_free_blocks == 4
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    c = Sequence("c", list(range(1, 9)), SamplingParams())  # 8 tokens, both blocks cached...
    bm.allocate(c)
    assert c.num_computed_tokens == 4  # ...but the block of the last token is computed again
    bm.free(a)
    bm.free(b)
    bm.free(c)
    assert bm.num_free_blocks == 8 and all(blk.ref_count == 0 for blk in bm.blocks)
    d = Sequence("d", list(range(1, 11)), SamplingParams())
    bm.allocate(d)  # freed blocks keep their hashes: found again
    assert d.num_computed_tokens == 8 and bm.num_free_blocks == 5


@pytest.mark.timeout(10)
def test_block_manager_evicts_least_recently_freed_cached_blocks():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a = Sequence("a", [1, 2, 3, 4, 5], SamplingParams())  # 3 blocks, 2 full
    bm.allocate(a)
    a.num_computed_tokens = 5
    bm.cache_full_blocks(a)
    bm.free(a)
    assert len(bm.hash_to_block_id) == 2 and bm.num_free_blocks == 4
    b = Sequence("b", [9, 9, 9, 9, 9, 9], SamplingParams())  # needs 3 of 4: evicts the oldest free
    bm.allocate(b)
    assert b.num_computed_tokens == 0
    cached = set(bm.hash_to_block_id.values())
    assert len(cached) == 1 and cached.isdisjoint(b.block_table)
    bm.free(b)
    again = Sequence("a2", [1, 2, 3, 4, 5], SamplingParams())
    bm.allocate(again)  # block 0 of a was freed last, so kept: a's first block survives
    assert again.num_computed_tokens == 2


@pytest.mark.timeout(10)
def test_block_manager_without_prefix_caching_shares_nothing():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = Sequence("a", list(range(1, 11)), SamplingParams())
    bm.allocate(a)
    a.num_computed_tokens = 10
    bm.cache_full_blocks(a)
    b = Sequence("b", list(range(1, 11)), SamplingParams())
    bm.allocate(b)
    assert b.num_computed_tokens == 0 and set(a.block_table).isdisjoint(b.block_table)


@pytest.mark.timeout(10)
def test_scheduler_finishes_on_max_tokens_and_abort():
    sched = Scheduler(_Cfg(), eos_token_ids={0})
    a = seq("a", 2, max_tokens=1)
    sched.add(a)
    assert step(sched, lambda s: 5)[1] == [("a", [5], True, "length")]
    b = seq("b", 2)
    sched.add(b)
    assert sched.abort("b") and sched.is_finished()


@pytest.mark.timeout(10)
def test_sampler_seed_reproducible_and_greedy():
    logits = torch.randn(3, 100)
    sampler = Sampler()

    def draw(seed):
        s = [Sequence(str(i), [1], SamplingParams(temperature=1.0, seed=seed)) for i in range(3)]
        return [sampler(logits, s) for _ in range(5)]

    assert draw(42) == draw(42)
    assert draw(42) != draw(43)
    greedy = [Sequence("g", [1], SamplingParams(temperature=0))]
    assert sampler(logits[:1], greedy) == [int(logits[0].argmax())]


@pytest.mark.timeout(10)
def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = top_p_filter(probs, 0.7)
    assert torch.allclose(kept, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert torch.equal(top_p_filter(probs, 0.1) > 0, torch.tensor([True, False, False, False]))


@pytest.mark.timeout(10)
def test_block_manager_shares_only_prompt_blocks_without_cache_output_blocks_and_none_for_prompt_logprobs():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=True, cache_output_blocks=False)
    a = Sequence("a", [1, 2, 3], SamplingParams())
    bm.allocate(a)
    for t in (4, 5):
        a.append_token(t)
        bm.may_append(a)
    a.num_computed_tokens = 5
    bm.cache_full_blocks(a)
    assert len(a.block_hashes) == 1  # [1, 2]; [3, 4] holds an output token's KV
    bm.free(a)
    b = Sequence("b", [1, 2, 3, 4, 5, 6], SamplingParams())
    bm.allocate(b)
    assert b.num_computed_tokens == 2
    c = Sequence("c", [1, 2, 3], SamplingParams(prompt_logprobs=1))
    bm.allocate(c)
    assert c.num_computed_tokens == 0  # every prompt position's logits are wanted
