"""Sampling fields and logprobs on a CUDA GPU (issue 11): the GPU sampler against the CPU one on
the same logits, and the engine's logprobs and prompt logprobs against transformers, on the
random-weight Qwen3-0.6B-shaped model of test_gpu_engine.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dormant.engines.base import SamplingParams
from dormant.engines.native.core.sequence import Sequence
from dormant.engines.native.cpu.sampler import Sampler
from dormant.engines.native.cuda.sampler import GPUSampler

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "bench"))
    from random_model import make_random_model

    return make_random_model(ROOT / "bench/configs/qwen3-0.6b.json", tmp_path_factory.mktemp("qwen3-0.6b"))


@pytest.fixture(scope="module")
def engine(model_dir):
    from dormant.engines.native.core.config import EngineConfig
    from dormant.engines.native.core.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(str(model_dir), device="cuda", max_model_len=1024, backup_weights=False))


def _seqs(params_list, output=(3, 3, 5)):
    seqs = []
    for i, params in enumerate(params_list):
        s = Sequence(f"r{i}", [1, 2, 3], params)
        for t in output:
            s.append_token(t)
        seqs.append(s)
    return seqs


@pytest.mark.timeout(120)
def test_gpu_sampler_greedy_with_penalties_bias_and_logprobs_matches_the_cpu_sampler():
    torch.manual_seed(0)
    logits = torch.randn(5, 151936)
    params = [SamplingParams(temperature=0, frequency_penalty=1.5, logprobs=5),
              SamplingParams(temperature=0, presence_penalty=2.0, repetition_penalty=1.3),
              SamplingParams(temperature=0, logit_bias={7: 50.0}, logprobs=0),
              SamplingParams(temperature=0),
              SamplingParams(temperature=0, logprobs=20)]
    cpu, gpu = _seqs(params), _seqs(params)
    assert GPUSampler()(logits.cuda(), gpu) == Sampler()(logits, cpu)
    for a, b in zip(cpu, gpu):
        assert len(a.logprobs) == len(b.logprobs)
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-4
            assert [t for t, _ in x.top] == [t for t, _ in y.top]


@pytest.mark.timeout(120)
def test_gpu_sampler_top_k_and_min_p_on_a_batch():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]], device="cuda")).repeat(512, 1)
    drawn = GPUSampler()(logits, _seqs([SamplingParams(temperature=1.0, top_k=2)] * 256
                                       + [SamplingParams(temperature=1.0, min_p=0.6)] * 256))
    assert set(drawn) == {0, 1}


@pytest.mark.timeout(600)
def test_engine_logprobs_and_prompt_logprobs_match_transformers(engine, model_dir):
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 151000, (40,), generator=g).tolist()
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2)
    engine.add_request("lp", prompt, params)
    outputs = []
    while engine.has_unfinished:
        outputs += [out for _rid, out in engine.step()]
    ids = [t for o in outputs for t in o.new_token_ids]
    prompt_lps = outputs[0].prompt_logprobs
    output_lps = [lp for o in outputs for lp in o.logprobs]
    assert len(prompt_lps) == len(prompt) and prompt_lps[0] is None and len(output_lps) == len(ids)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + ids], device="cuda")).logits[0].float()
    expected = torch.log_softmax(logits, dim=-1).cpu()
    for pos in range(1, len(prompt)):
        assert abs(prompt_lps[pos].logprob - expected[pos - 1, prompt[pos]].item()) < 0.1  # bf16
        assert len(prompt_lps[pos].top) == 2
    for j, lp in enumerate(output_lps):
        assert abs(lp.logprob - expected[len(prompt) - 1 + j, lp.token_id].item()) < 0.1


@pytest.mark.timeout(600)
def test_engine_frequency_penalty_changes_greedy_output_in_a_batch(engine):
    prompt = [9707, 11, 1879, 374] * 4
    greedy = SamplingParams(temperature=0, max_tokens=16)
    plain, penalized = engine.generate([prompt, prompt], [greedy, SamplingParams(temperature=0, max_tokens=16,
                                                                                 frequency_penalty=2.0)])
    assert penalized != plain
    assert max(penalized.count(t) for t in penalized) <= max(plain.count(t) for t in plain)
