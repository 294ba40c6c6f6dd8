"""The native engine on the real SmolLM2 (loaded once per module)."""

import gc

import psutil
import pytest
import torch

from dormant.engines.base import SamplingParams
from dormant.engines.native.core.config import EngineConfig
from dormant.engines.native.core.llm_engine import LLMEngine

GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def engine(model_dir):
    return LLMEngine(EngineConfig(str(model_dir)))  # dtype auto -> mixed on CPU


@pytest.fixture(scope="module")
def engine_fp32(model_dir):
    eng = LLMEngine(EngineConfig(str(model_dir), dtype="float32", backup_weights=False))
    yield eng
    del eng
    gc.collect()


def chat_ids(tokenizer, text):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


@pytest.mark.timeout(300)
def test_greedy_answers_paris(engine, tokenizer):
    [out] = engine.generate([chat_ids(tokenizer, "What is the capital of France?")], GREEDY)
    assert "Paris" in tokenizer.decode(out)


@pytest.mark.timeout(300)
def test_batched_decode_equals_each_alone(engine_fp32, tokenizer):
    prompts = [chat_ids(tokenizer, q) for q in ("What is the capital of France?", "Name a color.", "Count to five.", "Say hi.")]
    alone = [engine_fp32.generate([p], GREEDY)[0] for p in prompts]
    together = engine_fp32.generate(prompts, GREEDY)
    assert together == alone


@pytest.mark.timeout(300)
def test_logits_match_transformers(engine_fp32, model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from dormant.engines.native.core.sequence import Sequence
    from dormant.engines.native.cpu.attention import METADATA_KWARG

    prompts = [chat_ids(tokenizer, "What is the capital of France?"), tokenizer.encode("Once upon a time there")]
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    runner = engine_fp32.model_runner
    seqs = [Sequence(str(i), p, GREEDY) for i, p in enumerate(prompts)]
    bm = engine_fp32.scheduler.block_manager
    for s in seqs:
        bm.allocate(s)  # a cached prefix (earlier tests ran these prompts) is read from the cache
        s.num_scheduled_tokens = s.num_tokens - s.num_computed_tokens
    try:
        with torch.inference_mode():
            input_ids, positions, meta, last = runner.prepare_prefill(seqs)
            ours = runner.model(input_ids=input_ids, position_ids=positions, use_cache=False,
                                logits_to_keep=last, **{METADATA_KWARG: meta}).logits[0]
            for i, p in enumerate(prompts):
                theirs = ref(input_ids=torch.tensor([p])).logits[0, -1]
                torch.testing.assert_close(ours[i], theirs, atol=2e-3, rtol=1e-3)
    finally:
        for s in seqs:
            bm.free(s)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("level", [1, 2])
def test_sleep_frees_memory_and_wake_is_identical(engine, tokenizer, level):
    prompt = chat_ids(tokenizer, "What is the capital of France?")
    before = engine.generate([prompt], GREEDY)
    proc = psutil.Process()
    rss_awake = proc.memory_info().rss
    engine.sleep(level)
    assert engine.is_sleeping
    freed = rss_awake - proc.memory_info().rss
    assert freed >= 0.6 * engine.model_runner.weights_bytes, f"freed {freed} bytes"
    engine.wake_up()
    assert not engine.is_sleeping
    assert engine.generate([prompt], GREEDY) == before


def _switch(engine, prefix_caching: bool, chunked_prefill: bool, budget: int):
    sched = engine.scheduler
    sched.block_manager.enable_prefix_caching = prefix_caching
    sched.enable_chunked_prefill = chunked_prefill
    sched.max_num_batched_tokens = budget


@pytest.mark.timeout(300)
def test_prefix_caching_computes_only_the_tail_and_changes_nothing(engine_fp32, tokenizer):
    system = "You are a careful assistant. Answer in one short sentence, and never use lists. " * 3
    prompts = [chat_ids(tokenizer, system + q) for q in ("What is the capital of France?", "Name a color.")]
    runner, sched = engine_fp32.model_runner, engine_fp32.scheduler
    try:
        _switch(engine_fp32, prefix_caching=False, chunked_prefill=True, budget=8192)
        plain = [engine_fp32.generate([p], GREEDY)[0] for p in prompts]
        _switch(engine_fp32, prefix_caching=True, chunked_prefill=True, budget=8192)
        cached = [engine_fp32.generate([p], GREEDY)[0] for p in prompts]
        before = runner.num_processed_tokens
        again = engine_fp32.generate([prompts[0]], GREEDY)[0]
        processed = runner.num_processed_tokens - before
    finally:
        _switch(engine_fp32, prefix_caching=True, chunked_prefill=True, budget=engine_fp32.config.max_num_batched_tokens)
    assert cached == plain and again == plain[0]
    n, bs = len(prompts[0]), sched.block_manager.block_size
    tail = n - (n - 1) // bs * bs  # only the block of the last token is computed again
    assert processed == tail + len(again) - 1, (processed, n)
    shared = min(i for i, (x, y) in enumerate(zip(*prompts)) if x != y) // bs * bs
    assert shared >= 32  # the second prompt found the first's system-prompt blocks


@pytest.mark.timeout(300)
@pytest.mark.parametrize("question", ["How many legs does a spider have?", "What color is grass?"])
def test_prefix_cache_hits_give_the_uncached_tokens_in_the_default_dtype(engine, tokenizer, question):
    # Issue 11: in the mixed dtype the spider's answer changed when the whole prompt was cached
    # ("... is: 8" uncached, "... lies in the spider's anatomy" cached) and grass's when only the
    # system-prompt block was; the prompt's fp32 GEMMs took other bits with fewer rows, and the
    # bf16 decodes turned that into other tokens.
    prompt = chat_ids(tokenizer, question)
    params = SamplingParams(temperature=0, max_tokens=40)
    runner, bm = engine.model_runner, engine.scheduler.block_manager

    def generate_counting_prompt_tokens():
        before = runner.num_processed_tokens
        [out] = engine.generate([prompt], params)
        return out, runner.num_processed_tokens - before - (len(out) - 1)

    try:
        _switch(engine, prefix_caching=False, chunked_prefill=True, budget=8192)
        uncached, _ = generate_counting_prompt_tokens()
        _switch(engine, prefix_caching=True, chunked_prefill=True, budget=8192)
        bm.reset_prefix_cache()
        engine.generate([chat_ids(tokenizer, "Say hi.")], params)  # caches the system prompt's blocks
        head_cached, computed_after_head = generate_counting_prompt_tokens()
        whole_cached, computed_after_whole = generate_counting_prompt_tokens()
    finally:
        _switch(engine, prefix_caching=True, chunked_prefill=True, budget=engine.config.max_num_batched_tokens)
    assert len(prompt) > computed_after_head > computed_after_whole  # the hits were partial, then whole
    assert head_cached == uncached, tokenizer.decode(head_cached)
    assert whole_cached == uncached, tokenizer.decode(whole_cached)


@pytest.mark.timeout(300)
def test_prompts_cut_into_chunks_give_the_uncut_logprobs_in_the_default_dtype(engine, tokenizer):
    # Issue 11: a budget that cut a prompt inside a 16-token block (after 13, 21 or 37 tokens)
    # gave its KV from layer 1 on other bits, and its answer logprobs 0.05-0.09 apart (a cut
    # after 5 tokens, other tokens); chunks now end on block boundaries, as cache hits do.
    # (Alone: a decode batched with another request's takes other bits, cut or not.)
    prompt = chat_ids(tokenizer, "Explain in one sentence why the sky is blue, please, and be brief about it.")
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=2)
    sched = engine.scheduler
    schedule = sched.schedule

    def answer() -> tuple[list, list[int]]:
        chunks, logprobs = [], []

        def recorded():
            seqs = schedule()
            chunks.extend(s.num_scheduled_tokens for s in seqs if s.request_id == "cut" and not s.is_decode)
            return seqs

        sched.schedule = recorded
        engine.add_request("cut", prompt, params)
        while engine.has_unfinished:
            for _, out in engine.step():
                logprobs += [(e.token_id, e.logprob, e.top) for e in out.logprobs]
        return logprobs, chunks

    try:
        _switch(engine, prefix_caching=False, chunked_prefill=True, budget=8192)
        uncut, chunks = answer()
        assert chunks == [len(prompt)]
        for budget in (21, 37):  # decodes beside a prompt cut its budget too (test_native_units.py)
            _switch(engine, prefix_caching=False, chunked_prefill=True, budget=budget)
            cut, chunks = answer()
            assert len(chunks) > 1 and cut == uncut, (budget, chunks)
            assert all(n % 16 == 0 for n in chunks[:-1]), chunks
    finally:
        del sched.schedule
        _switch(engine, prefix_caching=True, chunked_prefill=True, budget=engine.config.max_num_batched_tokens)


@pytest.mark.timeout(300)
def test_mixed_chunked_steps_give_the_unmixed_tokens(engine_fp32, tokenizer):
    prompts = [chat_ids(tokenizer, q) for q in ("What is the capital of France?", "Name a color.", "Count to five.")]
    try:
        _switch(engine_fp32, prefix_caching=False, chunked_prefill=False, budget=8192)
        unmixed = engine_fp32.generate(prompts, GREEDY)
        _switch(engine_fp32, prefix_caching=False, chunked_prefill=True, budget=21)
        sched, steps = engine_fp32.scheduler, []
        schedule = sched.schedule

        def recorded():
            seqs = schedule()
            steps.append([s.is_decode for s in seqs])
            return seqs

        sched.schedule = recorded
        results = {f"m{i}": [] for i in range(len(prompts))}

        def step():
            for rid, out in engine_fp32.step():
                results[rid].extend(out.new_token_ids)

        for i, p in enumerate(prompts):  # staggered: later prompts' chunks join running decodes
            engine_fp32.add_request(f"m{i}", p, GREEDY)
            step()
            step()
        while engine_fp32.has_unfinished:
            step()
    finally:
        del engine_fp32.scheduler.schedule
        _switch(engine_fp32, prefix_caching=True, chunked_prefill=True, budget=engine_fp32.config.max_num_batched_tokens)
    mixed = [kinds for kinds in steps if any(kinds) and not all(kinds)]
    assert len(mixed) >= 2
    assert [results[f"m{i}"] for i in range(len(prompts))] == unmixed
