"""The rule of issue 11 at the protocol's edge: a field nothing acts on is a 400 naming it,
nested ones too (stream_options, content parts), and stream_options without a stream."""

from __future__ import annotations

import pytest

from dormant.errors import InvalidRequest
from dormant.protocol import ChatCompletionRequest, CompletionRequest, parse_request

pytestmark = pytest.mark.timeout(60)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(("extra", "param"), [
    ({"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats"),
    ({"stream": True, "stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}]}]},
     "messages[0].content"),
])
def test_what_nothing_acts_on_is_refused_by_name(extra, param):
    for cls, base in ((ChatCompletionRequest, CHAT), (CompletionRequest, {"model": "m", "prompt": "hi"})):
        if "messages" in extra and cls is CompletionRequest:
            continue
        with pytest.raises(InvalidRequest) as err:
            parse_request(cls, {**base, **extra})
        assert err.value.param == param, err.value.message


def test_what_is_acted_on_is_taken():
    req = parse_request(ChatCompletionRequest, {**CHAT, "stream": True,
                                                "stream_options": {"include_usage": True, "include_obfuscation": False}})
    assert req.include_usage
    assert not parse_request(ChatCompletionRequest, {**CHAT, "stream": True, "stream_options": None}).include_usage
    req = parse_request(ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert req.messages[0].text() == "ab"
