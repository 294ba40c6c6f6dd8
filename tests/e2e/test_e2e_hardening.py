"""Issue 15 against a live gateway and worker: a 50 MB body is 413 at once while a stream flows,
a worker's errors never break the requests after them, keep_alive never breaks /running."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import pytest

from e2e_harness import launch_gateway, model_config, wait_for

PROMPT = {"model": "smollm2", "prompt": "Count from 1 to 100:", "temperature": 0}


@pytest.fixture(scope="module")
def gw(home, module_workdir):
    gateway = launch_gateway(module_workdir, home, model_config())
    yield gateway
    gateway.stop()


def _ok(gw, **extra) -> httpx.Response:
    r = gw.http("POST", "/v1/completions", json={**PROMPT, "max_tokens": 2, **extra})
    assert r.status_code == 200, r.text
    return r


@pytest.mark.timeout(300)
def test_50mb_body_is_413_at_once_while_a_stream_flows(gw):
    _ok(gw)  # the worker is up
    events: list[tuple[float, str]] = []

    def stream() -> None:
        with gw.http_stream("/v1/completions", {**PROMPT, "max_tokens": 150, "stream": True}) as s:
            for data in s:
                events.append((time.monotonic(), data))

    t = threading.Thread(target=stream)
    t.start()
    wait_for(lambda: len(events) >= 3 or not t.is_alive(), 60, "the stream flowing")
    body = b'{"model": "smollm2", "prompt": "' + b"x" * (50 * 1024 * 1024) + b'"}'
    started = time.monotonic()
    with httpx.Client(timeout=30) as c:
        # the body as a stream: the 413 is read while the client still sends (as curl does)
        r = c.post(gw.base_url + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
    took = time.monotonic() - started
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert took < 1.0, took
    t.join(timeout=240)
    assert events[-1][1] == "[DONE]"
    assert sum(when > started + took for when, _ in events) >= 3  # the stream went on past the refusal


@pytest.mark.timeout(300)
def test_worker_errors_do_not_break_the_next_requests(gw):
    _ok(gw)
    bad = {**PROMPT, "prompt": [99_999_999], "max_tokens": 2}  # the gateway passes it, the worker refuses it
    for _ in range(3):
        r = gw.http("POST", "/v1/completions", json=bad)
        assert 400 <= r.status_code < 600 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = gw.http("POST", "/v1/completions", json={**bad, "stream": True})  # refused before a stream
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        with httpx.stream("POST", gw.base_url + "/v1/completions", timeout=60,
                          json={**PROMPT, "max_tokens": 200, "stream": True}) as r:
            next(r.iter_lines())  # a client that leaves mid-stream: the worker's side is cut
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda _: gw.http("POST", "/v1/completions",
                                                json={**PROMPT, "max_tokens": 2}).status_code, range(20)))
    assert codes == [200] * 20


@pytest.mark.timeout(300)
def test_keep_alive_extremes_leave_running_and_the_model_ready(gw):
    for value in ("99999999999h", 1e30, -7):
        _ok(gw, keep_alive=value)
        r = gw.http("GET", "/running", timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["running"][0]["idle_until"] is None  # never
    for raw in (b'"keep_alive": NaN', b'"keep_alive": 1e400'):
        r = gw.http("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                    content=b'{"model": "smollm2", "prompt": "hi", "max_tokens": 2, ' + raw + b"}")
        assert r.status_code == 400 and r.json()["error"]["param"] == "keep_alive"
    assert gw.replica()["state"] == "ready"
