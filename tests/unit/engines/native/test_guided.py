"""Structured output (core/guided.py) on the real SmolLM2 tokenizer, and through the engine."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from dormant.engines.base import Guidance, SamplingParams
from dormant.engines.native.core import guided
from dormant.engines.native.core.sequence import Sequence
from dormant.engines.native.cpu.sampler import Sampler
from dormant.engines.native.cuda.sampler import GPUSampler

pytestmark = pytest.mark.timeout(300)

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"},
                   "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
COPY_JSON = 'Reply with exactly this JSON and nothing else: {"animal": "cat", "legs": 4}'
KINDS = [
    (Guidance("json_schema", SCHEMA), lambda text: jsonschema.validate(json.loads(text), SCHEMA)),
    (Guidance("regex", r"[0-9]{3}-[a-z]{2,4}"),
     lambda text: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text) or pytest.fail(text)),
    (Guidance("choice", ["yes", "no", 'say "maybe"']),
     lambda text: text in ("yes", "no", 'say "maybe"') or pytest.fail(text)),
    (Guidance("grammar", 'start: "x=" NUM ";"\nNUM: /[1-9][0-9]?/'),
     lambda text: re.fullmatch(r"x=[1-9][0-9]?;", text) or pytest.fail(text)),
]


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def decoding(tokenizer):
    dec = guided.GuidedDecoding(len(tokenizer), {tokenizer.eos_token_id})
    dec.tokenizer = tokenizer
    return dec


def guided_seq(decoding, guidance: Guidance, request_id: str = "r") -> Sequence:
    seq = Sequence(request_id, [1, 2, 3], SamplingParams(guidance=guidance))
    seq.guide = decoding.matcher(guidance)
    return seq


def allowed_by_mask(seq: Sequence, vocab: int) -> set[int]:
    logits = torch.zeros((1, vocab))
    assert guided.mask_logits(logits, [seq])
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


def allowed_by_grammar(seq: Sequence, vocab: int) -> set[int]:
    """Every token the matcher accepts, one at a time, from copies of its state."""
    return {t for t in range(vocab) if seq.guide.deep_copy().consume_token(t)}


@pytest.mark.parametrize("prefix", ['{"name": "Al", "age": 3'])
def test_the_mask_allows_exactly_what_the_grammar_allows(decoding, tokenizer, prefix):
    """Every token the mask allows, the grammar accepts; a token the grammar accepts but the
    mask does not is only a shorter spelling of forced text that a longer allowed token
    spells (llguidance keeps forced text in its canonical tokens: `{"`, not `{` then `"`)."""
    seq = guided_seq(decoding, Guidance("json_schema", SCHEMA))
    for token in tokenizer.encode(prefix):
        assert not guided.advance(seq, token)
    vocab = len(tokenizer)
    mask = allowed_by_mask(seq, vocab)
    grammar = allowed_by_grammar(seq, vocab)
    assert 0 < len(mask) < vocab and mask <= grammar
    texts = [tokenizer.decode([t]) for t in mask]
    for t in grammar - mask:
        assert any(len(x) > len(tokenizer.decode([t])) and x.startswith(tokenizer.decode([t])) for x in texts), t


@pytest.mark.parametrize("guidance,valid", KINDS, ids=[g.kind for g, _ in KINDS])
def test_random_walks_through_the_mask_end_complete_and_valid(decoding, tokenizer, guidance, valid):
    """Sampling random logits through the mask: each walk ends by itself (advance says so, or
    EOS once the grammar allows it), and its text is what the constraint asked for."""
    gen = torch.Generator().manual_seed(0)
    eos = tokenizer.eos_token_id
    for walk in range(3):
        seq = guided_seq(decoding, guidance)
        tokens = []
        for _ in range(60):
            logits = torch.randn((1, len(tokenizer)), generator=gen)
            guided.mask_logits(logits, [seq])
            token = int(logits.argmax())
            done = guided.advance(seq, token)
            if token == eos:
                break
            tokens.append(token)
            if done:
                break
        else:
            pytest.fail(f"walk {walk} of {guidance.kind} did not end: {tokenizer.decode(tokens)!r}")
        valid(tokenizer.decode(tokens))


def test_guided_and_unguided_rows_batch_together_in_both_samplers(decoding, tokenizer):
    vocab = len(tokenizer)
    free = Sequence("free", [1, 2], SamplingParams(temperature=0))
    logits = torch.randn((3, vocab), generator=torch.Generator().manual_seed(1))
    yes_no = Guidance("choice", ["yes", "no"])
    for sampler in (Sampler(), GPUSampler()):
        seqs = [guided_seq(decoding, yes_no, "a"), free, guided_seq(decoding, yes_no, "b")]
        kwargs = {"greedy_ids": logits.argmax(-1)} if isinstance(sampler, GPUSampler) else {}
        ids = sampler(logits.clone(), seqs, **kwargs)
        assert ids[1] == int(logits[1].argmax())  # the unguided row is untouched
        for i in (0, 2):  # a graph's argmax, taken before the mask, must have been redone
            assert "yes".startswith(tokenizer.decode([ids[i]])) or "no".startswith(tokenizer.decode([ids[i]]))


def test_a_grammar_with_json_and_special_tokens_is_accepted(decoding, tokenizer):
    """What forced tool calls hand in: Lark with `%json{...}` and a special token by name."""
    lark = 'start: "<tool_call>" %json{"type": "object", "properties": {"x": {"type": "integer"}}, ' \
           '"required": ["x"]} "</tool_call>" <|im_end|>'
    seq = guided_seq(decoding, Guidance("grammar", lark))
    text_ids = tokenizer.encode('<tool_call>{"x": 5}</tool_call>')
    assert all(not guided.advance(seq, t) for t in text_ids)
    assert allowed_by_mask(seq, len(tokenizer)) == {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    assert guided.advance(seq, tokenizer.convert_tokens_to_ids("<|im_end|>"))


@pytest.mark.parametrize("guidance,words", [
    (Guidance("regex", "a(b"), "unclosed group"),
    (Guidance("json_schema", {"type": "objectx"}), "objectx"),
    (Guidance("json_schema", "{not json"), "not valid JSON"),
    (Guidance("grammar", "start: nosuchrule"), "nosuchrule"),
    (Guidance("grammar", 'start: "x" <|no_such_token|>'), "no_such_token"),
    (Guidance("choice", []), "non-empty list"),
])
def test_check_names_what_is_wrong(decoding, guidance, words):
    error = decoding.check(guidance)
    assert error is not None and words in error
    with pytest.raises(ValueError):
        decoding.matcher(guidance)


def test_gbnf_is_converted_to_lark(decoding):
    assert decoding.check(Guidance("grammar", 'root ::= "a" [0-9]+')) is None


# -- through the engine ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(model_dir, tokenizer):
    from dormant.engines.native.core.config import EngineConfig
    from dormant.engines.native.core.llm_engine import LLMEngine

    eng = LLMEngine(EngineConfig(str(model_dir), backup_weights=False))
    eng.use_tokenizer(tokenizer)
    return eng


def run(engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, tuple[list[int], str]]:
    out: dict[str, list] = {rid: [[], None] for rid in requests}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    while engine.has_unfinished:
        for rid, output in engine.step():
            out[rid][0].extend(output.new_token_ids)
            out[rid][1] = output.finish_reason or out[rid][1]
    return {rid: (ids, reason) for rid, (ids, reason) in out.items()}


def chat(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def test_the_engine_follows_guidance_beside_free_requests(engine, tokenizer):
    prompt = chat(tokenizer, "Describe a person as JSON.")
    free = SamplingParams(temperature=0, max_tokens=12)
    [alone] = engine.generate([prompt], free)
    out = run(engine, {
        "schema": (prompt, SamplingParams(temperature=0, max_tokens=80, guidance=Guidance("json_schema", SCHEMA))),
        "choice": (chat(tokenizer, "Is the sky blue?"),
                   SamplingParams(temperature=0.8, seed=3, max_tokens=20, guidance=Guidance("choice", ["yes", "no"]))),
        "free": (prompt, free),
    })
    ids, reason = out["schema"]
    jsonschema.validate(json.loads(tokenizer.decode(ids, skip_special_tokens=True)), SCHEMA)
    assert reason == "stop"
    ids, reason = out["choice"]
    assert tokenizer.decode(ids, skip_special_tokens=True) in ("yes", "no") and reason == "stop"
    assert out["free"] == (alone, "length")


def test_json_object_gives_a_json_object(engine, tokenizer):
    params = SamplingParams(temperature=0, max_tokens=60, guidance=Guidance("json_object"))
    [(ids, reason)] = run(engine, {"obj": (chat(tokenizer, COPY_JSON), params)}).values()
    assert reason == "stop" and isinstance(json.loads(tokenizer.decode(ids, skip_special_tokens=True)), dict)


def test_max_tokens_mid_structure_finishes_with_length(engine, tokenizer):
    params = SamplingParams(temperature=0, max_tokens=4, guidance=Guidance("json_schema", SCHEMA))
    [(ids, reason)] = run(engine, {"cut": (chat(tokenizer, "JSON please"), params)}).values()
    assert reason == "length" and len(ids) == 4
    assert tokenizer.decode(ids).startswith('{"name": ')


def test_the_engine_refuses_a_bad_grammar_at_admission(engine):
    with pytest.raises(ValueError, match="unclosed group"):
        engine.add_request("bad", [1, 2, 3], SamplingParams(guidance=Guidance("regex", "(")))
    assert not engine.has_unfinished
