"""Issue 15, the worker's side, against a live gateway and worker: what the worker refuses is a
400 before a stream's headers (item 7), a `max_tokens` past the context is refused (item 10),
and abandoned non-streamed requests free their slots at once (item 2)."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest

from e2e_harness import launch_gateway, model_config, wait_for

PROMPT = {"model": "smollm2", "prompt": "Count from 1 to 100:", "temperature": 0}
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Count from 1 to 100."}], "temperature": 0}
ABANDONED = 8  # the model's max_concurrent_requests: every slot taken


@pytest.fixture(scope="module")
def gw(home, module_workdir):
    gateway = launch_gateway(module_workdir, home, model_config(max_concurrent_requests=ABANDONED))
    yield gateway
    gateway.stop()


def _assert_400(r: httpx.Response, param: str) -> dict:
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")  # decided before a stream
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    return err


# what only the worker can judge: it knows the vocabulary and max_model_len
REFUSED_BY_THE_WORKER = [
    ("/v1/completions", {**PROMPT, "prompt": [99_999_999]}, "prompt"),
    ("/v1/completions", {**PROMPT, "prompt": "hello " * 20_000}, "prompt"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "hello " * 20_000}]}, "messages"),
    ("/v1/completions", {**PROMPT, "max_tokens": 1_000_000}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 1_000_000}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 5, "max_completion_tokens": 1_000_000}, "max_completion_tokens"),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path,body,param", REFUSED_BY_THE_WORKER)
def test_what_the_worker_refuses_is_a_400_before_any_stream(gw, path, body, param, stream):
    err = _assert_400(gw.http("POST", path, json={**body, "stream": stream}), param)
    if param.startswith("max_"):
        assert "maximum context length" in err["message"]
    r = gw.http("POST", "/v1/completions", json={**PROMPT, "max_tokens": 2, "stream": stream})
    assert r.status_code == 200, r.text  # and the next request is served


@pytest.mark.timeout(120)
@pytest.mark.parametrize("value", [2**63, 2**64, 1e30])
def test_absurd_max_tokens_is_refused_at_the_gateway(gw, value):
    for key, body in (("max_tokens", PROMPT), ("max_completion_tokens", CHAT)):
        path = "/v1/completions" if body is PROMPT else "/v1/chat/completions"
        _assert_400(gw.http("POST", path, json={**body, key: value, "stream": True}), key)


@pytest.mark.timeout(300)
def test_a_held_stream_carries_the_workers_refusal_in_its_error_event(gw):
    """Held through a start, the stream's headers are out: the error event keeps the worker's
    type and param (not a server_error)."""
    gw.http("POST", "/unload", json={"model": "smollm2"})
    gw.wait_state(("cold", "stopped", "hibernated"))
    with gw.http_stream("/v1/completions", {**PROMPT, "prompt": [99_999_999], "stream": True}) as events:
        payloads = list(events)
    assert payloads[-1] == "[DONE]" and len(payloads) == 2, payloads
    err = json.loads(payloads[0])["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "prompt", err
    assert gw.http("POST", "/v1/completions", json={**PROMPT, "max_tokens": 2}).status_code == 200


def _worker_running(gw) -> int:
    return gw.replica()["worker_stats"]["num_running"]  # the worker's own count, through the gateway


@pytest.mark.timeout(300)
def test_abandoned_plain_requests_free_their_slots(gw):
    assert gw.http("POST", "/v1/completions", json={**PROMPT, "max_tokens": 2}).status_code == 200

    def abandon(i: int) -> str:
        try:  # each client gives up long before 400 tokens are out (tens of seconds here)
            gw.http("POST", "/v1/completions", timeout=1.5,
                    json={**PROMPT, "prompt": f"{i}. Count from 1 to 1000:", "max_tokens": 400, "ignore_eos": True})
        except httpx.TimeoutException:
            return "left"
        return "answered"

    with concurrent.futures.ThreadPoolExecutor(ABANDONED) as pool:
        outcomes = list(pool.map(abandon, range(ABANDONED)))
    assert outcomes == ["left"] * ABANDONED  # had they been answered, nothing was abandoned
    left = time.monotonic()
    wait_for(lambda: gw.replica()["in_flight"] == 0, 5, "the gateway to free the abandoned slots")
    wait_for(lambda: _worker_running(gw) == 0, 5, "the worker to abort the abandoned generations")
    r = gw.http("POST", "/v1/completions", json={**PROMPT, "max_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text
    assert time.monotonic() - left < 10  # not the ~45 s the abandoned requests would have run
