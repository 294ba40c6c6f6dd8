"""Idle tiers with the real worker: ready -> asleep after sleep_after, and a request wakes it;
on the default's engine (llama.cpp without a GPU) and on the native engine."""

from __future__ import annotations

import threading

import pytest

from e2e_harness import launch_gateway, model_config, wait_for

CAPITAL = [{"role": "user", "content": "What is the capital of Germany?"}]
COUNTING = [{"role": "user", "content": "Count from 1 to 300, separated by commas."}]


@pytest.fixture(scope="module")
def gw(home, module_workdir):
    gateway = launch_gateway(module_workdir, home, model_config(sleep_after="1s"))
    yield gateway
    gateway.stop()


def ask(gw, messages=CAPITAL, max_tokens=24, keep_alive=None) -> str:
    extra = {"keep_alive": keep_alive} if keep_alive is not None else None
    reply = gw.openai().chat.completions.create(
        model="smollm2", messages=messages, temperature=0, max_tokens=max_tokens, extra_body=extra)
    return reply.choices[0].message.content


@pytest.mark.timeout(300)
def test_idle_replica_sleeps_and_the_next_request_wakes_it(gw):
    sleeps_and_wakes_with_memory_measured(gw)


@pytest.mark.timeout(300)
def test_the_native_engine_sleeps_and_wakes_too(home, tmp_path):
    native = launch_gateway(tmp_path, home, model_config(sleep_after="1s", engine="native"))
    try:
        sleeps_and_wakes_with_memory_measured(native)
        assert native.replica()["engine"] == "native"
    finally:
        native.stop()


def sleeps_and_wakes_with_memory_measured(gw) -> None:
    first = ask(gw, keep_alive=-1)  # stay ready until we have read the ready RSS
    ready = gw.wait_state("ready")
    awake_rss = wait_for(lambda: gw.replica()["memory_bytes"], 10, "worker RSS while ready")
    assert ready["idle_until"] is None  # keep_alive -1: no idle step armed

    ask(gw, max_tokens=1)  # no keep_alive: back to sleep_after=1s once it ends
    asleep = gw.wait_state("asleep", timeout=60)
    assert asleep["pid"] == ready["pid"]  # the process stays
    asleep_rss = wait_for(lambda: gw.replica()["memory_bytes"], 10, "worker RSS while asleep")
    assert asleep_rss < awake_rss, (asleep_rss, awake_rss)

    assert ask(gw) == first  # greedy output identical after waking
    assert gw.replica()["pid"] == ready["pid"]
    assert gw.metric("dormant:wake_seconds_count", model="smollm2", tier="asleep") >= 1
    assert gw.metric("dormant:state_transitions_total", model="smollm2", from_state="asleep", to_state="waking") >= 1


@pytest.mark.timeout(300)
def test_a_request_arriving_while_draining_is_served(gw):
    ask(gw, max_tokens=1, keep_alive=-1)
    gw.wait_state("ready")
    stream_events: list[str] = []
    unload_result: list = []
    late_answer: list[str] = []

    def long_stream() -> None:
        with gw.http_stream("/v1/chat/completions", {
                "model": "smollm2", "messages": COUNTING, "temperature": 0, "max_tokens": 80,
                "stream": True}) as events:
            for event in events:
                stream_events.append(event)

    streamer = threading.Thread(target=long_stream)
    streamer.start()
    wait_for(lambda: len(stream_events) >= 2 or not streamer.is_alive(), 60, "the stream's first tokens")
    unloader = threading.Thread(target=lambda: unload_result.append(gw.http("POST", "/unload").json()))
    unloader.start()
    gw.wait_state("draining", timeout=30)
    late = threading.Thread(target=lambda: late_answer.append(ask(gw, keep_alive=-1)))
    late.start()
    wait_for(lambda: gw.replica()["queued"] == 1 or not late.is_alive(), 10, "the late request held")
    for t in (streamer, unloader, late):
        t.join(timeout=240)
    assert stream_events[-1] == "[DONE]" and not any('"error"' in e for e in stream_events)
    assert unload_result == [{"unloaded": ["smollm2"]}]
    assert late_answer and "Berlin" in late_answer[0]
    assert gw.replica()["state"] == "ready"  # started again for the held request
