"""Sampling fields and logprobs through the native engine on the real SmolLM2 (CPU, the
default mixed dtype), and greedy output that does not depend on the prefix cache."""

import math

import pytest
import torch

from dormant.engines.base import SamplingParams
from dormant.engines.native.core.config import EngineConfig
from dormant.engines.native.core.llm_engine import LLMEngine


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def engine(model_dir):
    return LLMEngine(EngineConfig(str(model_dir), backup_weights=False))  # dtype auto -> mixed on CPU


def run(engine, prompt, params):
    """(completion ids, every RequestOutput) of one request run to the end."""
    engine.add_request("r", prompt, params)
    outputs = []
    while engine.has_unfinished:
        outputs += [out for _rid, out in engine.step()]
    return [t for out in outputs for t in out.new_token_ids], outputs


@pytest.mark.timeout(600)
def test_greedy_output_is_the_same_with_the_prompt_from_the_prefix_cache(engine, tokenizer):
    """The mixed dtype ran a cached prompt's last few tokens on bf16 weights and an uncached
    prompt on fp32 ones; the answers differed (issue 11). Tails of 1 and 3 tokens past
    the cached blocks (block_size 16; 3 is the default small_batch_tokens)."""
    greedy = SamplingParams(temperature=0, max_tokens=8, logprobs=0)
    base = tokenizer.encode("The history of the printing press begins in the fifteenth century, when a goldsmith")
    for tail in (1, 3):
        prompt = (tokenizer.encode(f"Story {tail}: ") + base * 3)[:32 + tail]  # no block shared with another tail
        before = engine.model_runner.num_processed_tokens
        uncached, first = run(engine, prompt, greedy)
        assert engine.model_runner.num_processed_tokens - before >= len(prompt)
        before = engine.model_runner.num_processed_tokens
        cached, again = run(engine, prompt, greedy)
        assert engine.model_runner.num_processed_tokens - before < len(prompt)  # the cache was hit
        assert cached == uncached, f"tail {tail}"
        # the first token's logits, from the prompt's last row: equal, not merely close
        assert abs(again[0].logprobs[0].logprob - first[0].logprobs[0].logprob) < 1e-4, f"tail {tail}"


@pytest.mark.timeout(600)
def test_prompt_and_output_logprobs_match_a_full_forward(engine, tokenizer, model_dir):
    from transformers import AutoModelForCausalLM

    prompt = tokenizer.encode("Paris is the capital of")
    run(engine, prompt, SamplingParams(temperature=0, max_tokens=1))  # now in the prefix cache: it must not be used
    ids, outputs = run(engine, prompt, SamplingParams(temperature=0, max_tokens=3, logprobs=2, prompt_logprobs=1))
    prompt_lps = outputs[0].prompt_logprobs
    assert [o.prompt_logprobs is None for o in outputs] == [False, True, True]
    assert prompt_lps[0] is None and [p.token_id for p in prompt_lps[1:]] == prompt[1:]
    output_lps = [lp for o in outputs for lp in o.logprobs]
    assert [lp.token_id for lp in output_lps] == ids and all(len(lp.top) == 2 for lp in output_lps)
    assert all(lp.top[0][0] == lp.token_id for lp in output_lps)  # greedy: the pick is the best

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.inference_mode():
        expected = torch.log_softmax(model(torch.tensor([prompt + ids])).logits[0].float(), dim=-1)
    for pos in range(1, len(prompt)):
        assert math.isclose(prompt_lps[pos].logprob, expected[pos - 1, prompt[pos]].item(), abs_tol=2e-3)
    # output tokens run on the bf16 copies (decodes): a looser match
    for j, lp in enumerate(output_lps):
        assert math.isclose(lp.logprob, expected[len(prompt) - 1 + j, lp.token_id].item(), abs_tol=5e-2)


@pytest.mark.timeout(600)
def test_frequency_penalty_and_logit_bias_change_greedy_output(engine, tokenizer):
    prompt = tokenizer.encode("1, 2, 3, 4, 5,")
    plain, _ = run(engine, prompt, SamplingParams(temperature=0, max_tokens=16))
    penalized, _ = run(engine, prompt, SamplingParams(temperature=0, max_tokens=16, frequency_penalty=2.0))
    assert penalized != plain
    counts = torch.bincount(torch.tensor(penalized))
    assert counts.max() <= torch.bincount(torch.tensor(plain)).max()
    banned = set(plain)
    biased, _ = run(engine, prompt, SamplingParams(temperature=0, max_tokens=8,
                                                   logit_bias={t: -100.0 for t in banned}))
    assert not banned & set(biased)
