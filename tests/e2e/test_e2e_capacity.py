"""How many requests a replica runs at once (issue 12), against real SmolLM2 workers: with no
max_concurrent_requests, as many as the worker reports its engine batches (max_num_seqs in its
/stats), so 64 concurrent streams are all admitted at once; with one, never more than it."""

from __future__ import annotations

import concurrent.futures
import threading

import httpx
import pytest

from e2e_harness import launch_gateway, wait_for

STREAMS = 64
BODY = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def gw(home, module_workdir):
    spec = {"source": "builtin:smollm2", "sleep_after": -1, "stop_after": -1, "engine_args": {"max_num_seqs": STREAMS}}
    gateway = launch_gateway(module_workdir, home, {"models": {
        "uncapped": spec, "capped": {**spec, "max_concurrent_requests": 4, "max_queue": STREAMS}}})
    yield gateway
    gateway.stop()


def burst(gw, model: str, streams: int, together: bool = False) -> tuple[list[int], dict[str, int]]:
    """`streams` concurrent streamed completions; the status of each, and the most in flight
    and queued that /running showed meanwhile. together: each client, once its first token
    came, waits for every other's first token before reading on, and the answers are long, so
    all of them are in flight at once for a while (with 12-token answers one could end before
    the last was sent: /running then showed 63 of 64)."""
    seen = {"in_flight": 0, "queued": 0}
    done = threading.Event()
    started = threading.Barrier(streams)

    def one(_: int) -> int:
        body = {**BODY, "model": model, **({"max_tokens": 64} if together else {})}
        lines = []
        with httpx.stream("POST", gw.base_url + "/v1/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    lines.append(line)
                    if together and len(lines) == 1:
                        started.wait(timeout=300)
        return r.status_code if lines[-1:] == ["data: [DONE]"] else -r.status_code

    def watch() -> None:
        while not done.wait(0.05):
            replica = gw.replica(model)
            for key in seen:
                seen[key] = max(seen[key], replica[key])

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(streams) as pool:
            statuses = list(pool.map(one, range(streams)))
    finally:
        done.set()
        watcher.join(timeout=30)
    return statuses, seen


@pytest.mark.timeout(600)
def test_without_a_cap_all_64_concurrent_requests_are_admitted_at_once(gw):
    gw.http("POST", "/v1/completions", json={**BODY, "model": "uncapped", "stream": False, "max_tokens": 1})
    replica = gw.replica("uncapped")
    assert replica["worker_stats"]["max_num_seqs"] == STREAMS
    assert replica["max_concurrent_requests"] == STREAMS
    statuses, seen = burst(gw, "uncapped", STREAMS, together=True)
    assert statuses == [200] * STREAMS
    assert seen == {"in_flight": STREAMS, "queued": 0}, seen


@pytest.mark.timeout(600)
def test_an_explicit_max_concurrent_requests_caps_what_the_worker_reports(gw):
    gw.http("POST", "/v1/completions", json={**BODY, "model": "capped", "stream": False, "max_tokens": 1})
    wait_for(lambda: gw.replica("capped")["state"] == "ready", 60, "capped ready")
    replica = gw.replica("capped")
    assert replica["worker_stats"]["max_num_seqs"] == STREAMS and replica["max_concurrent_requests"] == 4
    statuses, seen = burst(gw, "capped", 12)  # three rounds of 4
    assert statuses == [200] * 12
    assert seen["in_flight"] == 4 and seen["queued"] > 0, seen
