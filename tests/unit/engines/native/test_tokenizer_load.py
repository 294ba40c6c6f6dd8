"""The worker's tokenizer load (tokenizer_load.py) gives the tokenizer AutoTokenizer gives."""

from __future__ import annotations

import json
import shutil

import pytest

from dormant.engines.native.core.tokenizer_load import added_tokens_decoder, leading_value, load_tokenizer, preload
from dormant.store.models import materialize


@pytest.fixture(scope="module")
def smollm2_tokenizer_dir(tmp_path_factory):
    """SmolLM2's tokenizer files (no added_tokens_decoder in its tokenizer_config.json)."""
    src = materialize("builtin:smollm2")
    out = tmp_path_factory.mktemp("tok")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out


@pytest.mark.timeout(120)
def test_the_same_tokenizer_as_transformers_builds(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    assert added_tokens_decoder(smollm2_tokenizer_dir) is not None  # the short path runs here
    ours, theirs = load_tokenizer(smollm2_tokenizer_dir), AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    assert type(ours) is type(theirs)
    assert ours.added_tokens_decoder == theirs.added_tokens_decoder and len(ours.added_tokens_decoder) > 0
    assert ours.special_tokens_map == theirs.special_tokens_map and ours.eos_token_id == theirs.eos_token_id
    text = "Hello <|im_start|>user\nworld<|im_end|> <|endoftext|> ünïcode"
    assert ours.encode(text) == theirs.encode(text)
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == theirs.decode(theirs.encode(text), skip_special_tokens=True)
    chat = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(chat, tokenize=False) == theirs.apply_chat_template(chat, tokenize=False)


@pytest.mark.timeout(60)
def test_transformers_keeps_the_load_where_it_reads_more_than_tokenizer_json(smollm2_tokenizer_dir, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(smollm2_tokenizer_dir, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "special_tokens_map.json").write_text("{}")  # a legacy file transformers also reads
    assert added_tokens_decoder(d) is None
    (d / "special_tokens_map.json").unlink()
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "added_tokens_decoder": {}}))
    assert added_tokens_decoder(d) is None  # transformers takes them from the config
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "tokenizer.json").write_text('{"model": {"vocab": {}}, "added_tokens": []}')  # not where HF writes it
    assert added_tokens_decoder(d) is None
    (d / "tokenizer.json").write_text('{"added_tokens": [')  # truncated
    assert added_tokens_decoder(d) is None


@pytest.mark.timeout(30)
def test_leading_value_decodes_only_what_comes_before():
    text = '{ "version": "1.0", "padding": {"a": [1, 2]},\n "added_tokens": [{"id": 3}], "model": <not json> }'
    assert leading_value(text, "added_tokens") == [{"id": 3}]
    with pytest.raises(ValueError):
        leading_value(text, "missing")  # reaches "model" first
    with pytest.raises(ValueError):
        leading_value('{"a": 1}', "b")
    with pytest.raises(ValueError):
        leading_value("[1, 2]", "a")


@pytest.mark.timeout(120)
def test_a_preloaded_tokenizer_is_taken_while_its_files_are_unchanged(smollm2_tokenizer_dir, tmp_path):
    import os

    other = tmp_path / "other"
    shutil.copytree(smollm2_tokenizer_dir, other)
    preload([str(smollm2_tokenizer_dir), str(other), str(tmp_path / "no-such-model")]).join(timeout=100)
    from dormant.engines.native.core import tokenizer_load

    first = tokenizer_load._preloaded[smollm2_tokenizer_dir.resolve()].result()[1]
    assert load_tokenizer(smollm2_tokenizer_dir) is first
    assert tokenizer_load._preloaded == {}  # a worker serves one model: the others are dropped

    preload([str(other)]).join(timeout=100)
    stale = tokenizer_load._preloaded[other.resolve()].result()[1]
    config = other / "tokenizer_config.json"
    st = config.stat()
    os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten since the preload
    fresh = load_tokenizer(other)
    assert fresh is not stale and fresh.encode("hello") == stale.encode("hello")
