"""Incremental detokenization against a full decode, with the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest

from dormant.worker.detokenizer import IncrementalDetokenizer

TEXTS = [
    "The capital of France is Paris.",
    "  leading spaces, émigré café — naïve 東京 🙂 end",
    "line one\nline two\n\n  indented  code();",
]


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _stream(tokenizer, ids, stop=None, step=1):
    detok = IncrementalDetokenizer(tokenizer, stop)
    out = ""
    for i in range(0, len(ids), step):
        out += detok.add(ids[i : i + step])
        if detok.stopped:
            return out, True
    return out + detok.flush(), False


@pytest.mark.timeout(120)
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step", [1, 3])
def test_streamed_text_equals_full_decode(tokenizer, text, step):
    ids = tokenizer.encode(text, add_special_tokens=False)
    out, stopped = _stream(tokenizer, ids, step=step)
    assert not stopped
    assert out == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.timeout(120)
def test_stop_string_is_cut_and_never_partly_sent(tokenizer):
    ids = tokenizer.encode("Paris is the capital. Rome is another.", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, ["Rome", "capital."])
    pieces = []
    for token in ids:
        pieces.append(detok.add([token]))
        assert not "".join(pieces).endswith(("cap", "capital")), "a partial stop string was sent"
        if detok.stopped:
            break
    assert detok.stopped and "".join(pieces) == "Paris is the "
    assert detok.stop_string == "capital."  # the one found, for the choice's stop_reason


@pytest.mark.timeout(120)
def test_cost_per_token_stays_flat(tokenizer):
    """Each step decodes a short window, not the whole output so far."""
    calls: list[int] = []

    class Counting:
        def decode(self, ids, **kw):
            calls.append(len(ids))
            return tokenizer.decode(ids, **kw)

    ids = tokenizer.encode("word " * 600, add_special_tokens=False)
    detok = IncrementalDetokenizer(Counting())
    for token in ids:
        detok.add([token])
    assert max(calls) <= 8
