"""proxy._relay: what one worker SSE event becomes for the client, and what the gateway reads
from it (usage for the counters, the first token for the time-to-first-token)."""

from __future__ import annotations

import json

from dormant.gateway.proxy import _relay
from dormant.protocol import SSE_DONE


def _event(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode()


TOKEN = {"choices": [{"index": 0, "delta": {"content": "Hi"}}], "usage": None}
USAGE = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
QUOTED = {"choices": [{"index": 0, "delta": {"content": '"usage": {"a": 1}'}}], "usage": None}


def test_a_token_event_passes_unchanged_and_is_seen_as_the_first_token():
    out, usage, has_token, done = _relay(_event(TOKEN), client_wants_usage=False)
    assert (out, usage, has_token, done) == (_event(TOKEN) + b"\n\n", None, True, False)


def test_after_the_first_token_events_without_usage_pass_unparsed():
    for obj in (TOKEN, QUOTED):
        out, usage, has_token, _ = _relay(_event(obj), client_wants_usage=False, wants_token=False)
        assert (out, usage, has_token) == (_event(obj) + b"\n\n", None, False)


def test_the_usage_chunk_is_read_and_dropped_unless_the_client_asked():
    for wants_token in (True, False):
        out, usage, _, _ = _relay(_event(USAGE), client_wants_usage=False, wants_token=wants_token)
        assert (out, usage) == (None, USAGE["usage"])
        out, usage, _, _ = _relay(b"data: " + json.dumps(USAGE).encode(), client_wants_usage=True,
                                  wants_token=wants_token)  # spaces after the colons: still found
        assert out is not None and usage == USAGE["usage"]


def test_done_and_comments():
    assert _relay(b"data: [DONE]", False, wants_token=False) == (SSE_DONE, None, False, True)
    assert _relay(b": keep-alive", False) == (b": keep-alive\n\n", None, False, False)


def test_the_events_of_one_read_go_to_the_client_in_one_write():
    """_relay_events: the worker's events as they come, those of one read joined (under load a
    read holds several: one write for them, not one each), up to [DONE]; an event split over
    two reads waits for its end."""
    import asyncio
    from types import SimpleNamespace

    from dormant.gateway.proxy import _relay_events

    token, usage = _event(TOKEN) + b"\n\n", _event(USAGE) + b"\n\n"
    reads = [token + token[:9], token[9:] + token + usage, b"data: [DONE]\n\n", b"after the end"]

    class Worker:
        async def aiter_raw(self):
            for read in reads:
                yield read

    call = SimpleNamespace(fwd=SimpleNamespace(client_wants_usage=True), ttft_s=None, usage=None, arrived=0.0)

    async def relay():
        return [out async for out in _relay_events(call, Worker())]

    writes = asyncio.run(relay())
    assert writes == [token, token + token + usage, SSE_DONE]
    assert call.usage == USAGE["usage"] and call.ttft_s is not None
