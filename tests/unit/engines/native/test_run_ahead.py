"""Decode steps launched ahead (core/llm_engine.py) on the real SmolLM2: the same tokens as
steps taken in turn, whatever ends, arrives or is aborted while a step runs ahead, and no KV
block is lost. The CPU runner's launch runs at once, so this is the engine's and the
scheduler's side of running ahead; the GPU runner's side (the device-side feed) is in
tests/gpu."""

import gc

import pytest

from dormant.engines.base import SamplingParams
from dormant.engines.native.core.config import EngineConfig, run_ahead_enabled
from dormant.engines.native.core.llm_engine import LLMEngine
from dormant.engines.native.core.sequence import PLACEHOLDER


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = LLMEngine(EngineConfig(str(model_dir), dtype="float32", backup_weights=False))
    yield eng
    del eng
    gc.collect()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture
def counted(engine):
    """engine with runs_ahead set by the test, counting its fed launches; restored after."""
    runner = engine.model_runner
    launch, before = runner.launch, runner.runs_ahead
    counts = {"fed": 0}

    def counting(seqs, feed=None):
        if feed is not None:
            counts["fed"] += 1
            assert all(seq.token_ids[-1] == PLACEHOLDER for seq in seqs)
        return launch(seqs, feed)

    runner.launch = counting
    yield engine, counts
    runner.launch, runner.runs_ahead = launch, before
    assert not engine.has_unfinished


def ids(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


def both_ways(engine, counts, prompts, params):
    """generate() in turn, then ahead; the fed launches of the second."""
    free = engine.scheduler.block_manager.num_free_blocks
    engine.model_runner.runs_ahead = False
    in_turn = engine.generate(prompts, params)
    assert counts["fed"] == 0
    engine.model_runner.runs_ahead = True
    ahead = engine.generate(prompts, params)
    assert engine.scheduler.block_manager.num_free_blocks == free  # nothing held by a dropped step
    return in_turn, ahead


@pytest.mark.timeout(300)
def test_ahead_gives_the_tokens_of_steps_in_turn_whatever_ends_them(counted, tokenizer):
    engine, counts = counted
    prompts = [ids(tokenizer, q) for q in ("What is the capital of France?", "Name a color.", "Count to five.",
                                           "Say hi.", "Write a haiku about rain.")]
    greedy = SamplingParams(temperature=0, max_tokens=24)
    [probe] = engine.generate([prompts[2]], greedy)
    stop_id = probe[6]  # a token the third answer meets mid-way: it stops there, the rest run on
    params = [
        greedy,
        SamplingParams(temperature=0, max_tokens=1),  # ends by length at its first token
        SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_id]),  # ends while a step runs ahead
        SamplingParams(temperature=0, max_tokens=20),
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
    ]
    in_turn, ahead = both_ways(engine, counts, prompts, params)
    assert ahead == in_turn
    assert len(ahead[1]) == 1 and ahead[2][-1] == stop_id and len(ahead[2]) <= 7
    assert counts["fed"] >= 30  # the longest ran ahead at nearly every step


@pytest.mark.timeout(300)
def test_seeded_draws_ahead_are_the_draws_in_turn(counted, tokenizer):
    """Each seed draws from its own generator. (Where a seq ends by a token, the step run
    ahead for it computes the others in a larger batch: fp32 sums of another order, which
    a draw near a tie may follow; so here none ends early.)"""
    engine, counts = counted
    prompts = [ids(tokenizer, q) for q in ("Tell me a story.", "Name three animals.", "Say hi.")]
    params = [SamplingParams(temperature=t, top_p=p, top_k=k, seed=seed, max_tokens=16, ignore_eos=True)
              for t, p, k, seed in ((0.9, 0.9, 0, 7), (1.2, 1.0, 20, 11), (0.7, 0.95, 0, 3))]
    in_turn, ahead = both_ways(engine, counts, prompts, params)
    assert ahead == in_turn
    assert counts["fed"] >= 14


@pytest.mark.timeout(300)
def test_a_step_whose_seqs_need_their_tokens_read_does_not_run_ahead(counted, tokenizer):
    engine, counts = counted
    prompts = [ids(tokenizer, "Name a color."), ids(tokenizer, "Say hi.")]
    params = [SamplingParams(temperature=0, max_tokens=12),
              SamplingParams(temperature=0, max_tokens=12, logprobs=2)]
    in_turn, ahead = both_ways(engine, counts, prompts, params)
    assert ahead == in_turn and counts["fed"] == 0


def _drain(engine, results):
    while engine.has_unfinished:
        for request_id, out in engine.step():
            results.setdefault(request_id, []).extend(out.new_token_ids)


@pytest.mark.timeout(300)
def test_a_prompt_arriving_and_an_abort_while_a_step_runs_ahead(counted, tokenizer):
    engine, counts = counted
    greedy = SamplingParams(temperature=0, max_tokens=30)
    first, second, third = (ids(tokenizer, q) for q in ("Count to ten.", "Name a fruit.", "Say hello."))
    alone = {name: engine.generate([p], greedy)[0] for name, p in (("a", first), ("b", second))}
    free = engine.scheduler.block_manager.num_free_blocks

    engine.model_runner.runs_ahead = True
    results: dict[str, list[int]] = {}
    engine.add_request("a", first, greedy)
    engine.add_request("c", third, greedy)
    for _ in range(6):  # a and c decode, a step ahead
        for request_id, out in engine.step():
            results.setdefault(request_id, []).extend(out.new_token_ids)
    assert engine._ahead is not None
    assert engine.abort_request("c")  # while its next step runs
    engine.add_request("b", second, greedy)  # waits: the step ahead ends before it is admitted
    _drain(engine, results)

    assert results["a"] == alone["a"] and results["b"] == alone["b"]
    assert 0 < len(results["c"]) <= 6
    assert counts["fed"] >= 20
    assert engine.scheduler.block_manager.num_free_blocks == free


def test_run_ahead_follows_the_environment(monkeypatch):
    monkeypatch.delenv("DORMANT_RUN_AHEAD", raising=False)
    assert run_ahead_enabled(True) and not run_ahead_enabled(False)
    monkeypatch.setenv("DORMANT_RUN_AHEAD", "0")
    assert not run_ahead_enabled(True)
    monkeypatch.setenv("DORMANT_RUN_AHEAD", "1")
    assert run_ahead_enabled(False)
