"""Failures with real processes: a worker killed mid-stream, a failed start, keep-warm, orphans."""

from __future__ import annotations

import json
import os
import signal

import psutil
import pytest

from e2e_harness import launch_gateway, model_config, wait_for

CAPITAL = [{"role": "user", "content": "What is the capital of Germany?"}]
COUNTING = [{"role": "user", "content": "Count from 1 to 300, separated by commas."}]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_no_orphan_after(gw, sig: signal.Signals) -> None:
    pid = gw.replica()["pid"]
    assert pid and psutil.pid_exists(pid)
    gw.stop(sig)
    wait_for(lambda: gone(pid), 30, f"worker {pid} to exit after the gateway's {sig.name}")


@pytest.mark.timeout(300)
def test_worker_killed_mid_stream_ends_the_stream_cleanly_and_the_next_request_recovers(home, tmp_path):
    """...and SIGKILL of the gateway leaves no orphan worker (PR_SET_PDEATHSIG)."""
    gw = launch_gateway(tmp_path, home, model_config())
    try:
        events: list[str] = []
        with gw.http_stream("/v1/chat/completions", {
                "model": "smollm2", "messages": COUNTING, "temperature": 0, "max_tokens": 200,
                "stream": True}) as stream:
            for event in stream:
                events.append(event)
                if len(events) == 2:
                    pid = gw.replica()["pid"]
                    os.kill(pid, signal.SIGKILL)
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "service_unavailable" and error["message"]
        wait_for(lambda: gone(pid), 10, "the killed worker to vanish")
        gw.wait_state("cold", timeout=30)
        reply = gw.openai().chat.completions.create(model="smollm2", messages=CAPITAL, temperature=0, max_tokens=24)
        assert "Berlin" in reply.choices[0].message.content
        assert gw.replica()["pid"] not in (None, pid)
        assert_no_orphan_after(gw, signal.SIGKILL)
    finally:
        gw.stop()


@pytest.mark.timeout(300)
def test_a_failed_start_is_503_then_retried(home, tmp_path):
    broken = tmp_path / "broken.gguf"  # passes the config's check (the file is there); its import fails
    broken.write_bytes(b"not a GGUF file")
    config = {"models": {"broken": {"source": str(broken), "start_timeout": "120s"}}}
    gw = launch_gateway(tmp_path, home, config)
    try:
        r = gw.http("POST", "/v1/chat/completions", json={"model": "broken", "messages": CAPITAL})
        assert r.status_code == 503, r.text
        assert 1 <= int(r.headers["Retry-After"]) <= 60
        assert "broken" in r.json()["error"]["message"]
        assert gw.replica("broken")["state"] == "cold"
        with gw.http_stream("/v1/chat/completions", {"model": "broken", "messages": CAPITAL, "stream": True}) as s:
            events = list(s)
        assert events[-1] == "[DONE]" and "error" in json.loads(events[-2])
    finally:
        gw.stop()


@pytest.mark.timeout(300)
def test_keep_warm_starts_at_startup_and_after_a_crash(home, tmp_path):
    """...and SIGTERM of the gateway stops the worker before it exits."""
    gw = launch_gateway(tmp_path, home, model_config(min_replicas=1, sleep_after=0))
    try:
        first = gw.wait_state("ready", timeout=240)  # no request: min_replicas starts it
        os.kill(first["pid"], signal.SIGKILL)
        again = wait_for(lambda: (r := gw.replica())["state"] == "ready" and r["pid"] != first["pid"] and r,
                         240, "the keep-warm replica restarted after a crash")
        assert gw.metric("dormant:state_transitions_total", model="smollm2", to_state="cold") >= 1
        reply = gw.openai().chat.completions.create(model="smollm2", messages=CAPITAL, temperature=0, max_tokens=4)
        assert reply.choices[0].message.content
        assert gw.replica()["state"] == "ready" and gw.replica()["pid"] == again["pid"]  # sleep_after ignored
        assert_no_orphan_after(gw, signal.SIGTERM)
    finally:
        gw.stop()
