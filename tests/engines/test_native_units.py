"""Block manager, scheduler and sampler, without a model."""

import pytest
import torch

from dormant.engines.native.block_manager import BlockManager
from dormant.engines.native.sampler import Sampler, top_p_filter
from dormant.engines.native.sampling_params import SamplingParams
from dormant.engines.native.scheduler import Scheduler
from dormant.engines.native.sequence import Sequence


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


@pytest.mark.timeout(10)
def test_scheduler_prefill_then_batched_decode_and_preemption():
    sched = Scheduler(_Cfg(), eos_token_ids={0})
    a, b = seq("a", 4, max_tokens=10), seq("b", 4, max_tokens=10)
    sched.add(a)
    sched.add(b)
    seqs, is_prefill = sched.schedule()
    assert is_prefill and seqs == [a, b]  # one block each
    sched.postprocess(seqs, [7, 7])  # both now need a second block; only one is free
    seqs, is_prefill = sched.schedule()
    assert not is_prefill and seqs == [a]  # b, the most recent, was preempted
    assert list(sched.waiting) == [b] and b.block_table == []
    out = sched.postprocess(seqs, [0])  # EOS finishes a and frees its blocks
    assert out == [("a", [0], True, "stop")]
    seqs, is_prefill = sched.schedule()
    assert is_prefill and seqs == [b] and b.num_tokens == 5  # recomputed with its output so far


@pytest.mark.timeout(10)
def test_scheduler_finishes_on_max_tokens_and_abort():
    sched = Scheduler(_Cfg(), eos_token_ids={0})
    a = seq("a", 2, max_tokens=1)
    sched.add(a)
    seqs, _ = sched.schedule()
    assert sched.postprocess(seqs, [5]) == [("a", [5], True, "length")]
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
