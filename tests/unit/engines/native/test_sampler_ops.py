"""The samplers' logit processing (core/logits_ops.py), on both samplers, without a model."""

import math

import pytest
import torch

from dormant.engines.base import SamplingParams
from dormant.engines.native.core.logits_ops import (
    apply_penalties_and_bias,
    filter_probs,
    record_prompt_logprobs,
)
from dormant.engines.native.core.sequence import Sequence
from dormant.engines.native.cpu.sampler import Sampler
from dormant.engines.native.cuda.sampler import GPUSampler

SAMPLERS = [Sampler, GPUSampler]


def seq(prompt, output=(), **params):
    s = Sequence("r", list(prompt), SamplingParams(**{"temperature": 0, **params}))
    for t in output:
        s.append_token(t)
    return s


@pytest.mark.timeout(10)
def test_frequency_and_presence_penalties_count_only_output_tokens():
    logits = torch.zeros(2, 6)
    seqs = [seq([5], [1, 1, 2], frequency_penalty=0.5, presence_penalty=0.25), seq([5], [1])]
    out = apply_penalties_and_bias(logits, seqs)
    assert out[0].tolist() == [0, -1.25, -0.75, 0, 0, 0]  # 2 x 0.5 + 0.25; 0.5 + 0.25; prompt untouched
    assert out[1].tolist() == [0] * 6  # a row that asks nothing is left as it was
    assert logits.eq(0).all()  # out of place: the input may be a graph's output buffer


@pytest.mark.timeout(10)
def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_prompt_and_output():
    logits = torch.tensor([[2.0, -2.0, 2.0, 2.0]])
    out = apply_penalties_and_bias(logits, [seq([0], [1], repetition_penalty=2.0)])
    assert out[0].tolist() == [1.0, -4.0, 2.0, 2.0]


@pytest.mark.timeout(10)
def test_logit_bias_adds_per_token_and_ignores_ids_past_the_vocabulary():
    out = apply_penalties_and_bias(torch.zeros(1, 4), [seq([0], logit_bias={3: 100.0, 1: -100.0, 99: 5.0})])
    assert out[0].tolist() == [0, -100, 0, 100]


@pytest.mark.parametrize("make", SAMPLERS)
@pytest.mark.timeout(10)
def test_penalties_and_bias_change_greedy_picks(make):
    logits = torch.tensor([[3.0, 2.0, 0.0], [3.0, 2.0, 0.0], [3.0, 2.0, 0.0]])
    seqs = [seq([9], [0], frequency_penalty=2.0), seq([9], logit_bias={2: 10.0}), seq([9], [0])]
    assert make()(logits, seqs) == [1, 2, 0]


@pytest.mark.timeout(10)
def test_top_k_min_p_and_top_p_cut_per_row():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3)
    top_k = torch.tensor([[2], [0], [0]])
    min_p = torch.tensor([[0.0], [0.5], [0.0]])
    top_p = torch.tensor([[1.0], [1.0], [0.6]])
    kept = filter_probs(probs, top_k, top_p, min_p) > 0
    assert kept.tolist() == [[True, True, False, False],  # the 2 most likely
                             [True, True, False, False],  # at least half the best one's 0.5
                             [True, True, False, False]]  # 0.5 + 0.3 reaches 0.6
    # top_p after top_k applies to the kept tokens' renormalized mass: 0.5 / 0.8 < 0.7
    assert (filter_probs(probs[:1], torch.tensor([[2]]), torch.tensor([[0.7]]), None) > 0).tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("make", SAMPLERS)
@pytest.mark.timeout(30)
def test_sampled_rows_draw_only_within_top_k_and_min_p(make):
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])).repeat(200, 1)
    sampler = make()
    drawn = sampler(logits, [seq([9], temperature=1.0, top_k=2) for _ in range(200)])
    assert set(drawn) == {0, 1}
    drawn = sampler(logits, [seq([9], temperature=1.0, min_p=0.6) for _ in range(200)])
    assert set(drawn) == {0, 1}  # 0.3 >= 0.6 x 0.4; 0.2 is not


@pytest.mark.parametrize("make", SAMPLERS)
@pytest.mark.timeout(10)
def test_logprobs_are_the_raw_log_softmax_with_the_best_alternatives(make):
    torch.manual_seed(0)
    logits = torch.randn(3, 10)
    best = int(logits[0].argmax())
    seqs = [seq([9], [best], logprobs=3, frequency_penalty=100.0), seq([9]),
            seq([9], logprobs=0, temperature=1.0, seed=1)]
    ids = make()(logits, seqs)
    assert ids[0] != best  # the penalty moves the pick, not the logprobs
    expected = torch.log_softmax(logits, dim=-1)
    (first,), (third,) = seqs[0].logprobs, seqs[2].logprobs
    assert seqs[1].logprobs == []
    assert first.token_id == ids[0] and math.isclose(first.logprob, expected[0, ids[0]].item(), abs_tol=1e-5)
    values, idx = expected[0].topk(3)
    assert [t for t, _ in first.top] == idx.tolist()
    assert all(math.isclose(a, b, abs_tol=1e-5) for (_, a), b in zip(first.top, values.tolist()))
    assert third.top == () and math.isclose(third.logprob, expected[2, ids[2]].item(), abs_tol=1e-5)


@pytest.mark.timeout(10)
def test_prompt_logprobs_of_chunks_and_of_a_recomputed_prompt():
    torch.manual_seed(0)
    s = seq([3, 1, 4, 1, 5], prompt_logprobs=1)
    logits = torch.randn(5, 8)
    record_prompt_logprobs(s, logits[:2], 0)  # chunk of positions 0..1 predicts tokens 1..2
    record_prompt_logprobs(s, logits[2:], 2)  # positions 2..4 predict 3..4; the last is the sample's
    expected = torch.log_softmax(logits, dim=-1)
    assert s.prompt_logprobs[0] is None and len(s.prompt_logprobs) == 5
    for pos in range(1, 5):
        entry = s.prompt_logprobs[pos]
        assert entry.token_id == s.token_ids[pos]
        assert math.isclose(entry.logprob, expected[pos - 1, s.token_ids[pos]].item(), abs_tol=1e-5)
        assert entry.top[0][0] == int(expected[pos - 1].argmax())
    record_prompt_logprobs(s, logits, 0)  # a preempted sequence computes its prompt again
    assert len(s.prompt_logprobs) == 5
