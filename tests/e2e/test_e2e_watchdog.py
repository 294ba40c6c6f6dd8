"""A hung worker and a dead zygote, with real processes (issue 15, items 5 and 8).

`kill -STOP` on a worker: its requests end with an error within seconds (the watchdog's probes
of /health go unanswered, it kills the worker, their connections close) and the next request
is answered by a new worker. `kill -9` on the zygote: a new one is started, and it forks the
next worker.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time

import psutil
import pytest

from e2e_harness import launch_gateway, model_config, wait_for

CAPITAL = [{"role": "user", "content": "What is the capital of Germany?"}]
COUNTING = [{"role": "user", "content": "Count from 1 to 300, separated by commas."}]
# probes every second, three unanswered: a hang is noticed within ~6 s
WATCHDOG = {"worker_health_interval": "1s", "worker_health_failures": 3}
# a hung worker's requests end within this (probes, the kill, the error) on a loaded 2-core box
BOUND_SECONDS = 30


def resume_and_kill(pid: int) -> None:
    """Cleanup: a stopped worker the test left must not linger."""
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def zygote_pids(gateway_pid: int) -> list[int]:
    return [p.pid for p in psutil.Process(gateway_pid).children()
            if "dormant.worker.zygote" in " ".join(p.cmdline())]


@pytest.mark.timeout(300)
def test_a_stopped_worker_gets_its_requests_an_error_and_is_restarted(home, tmp_path):
    gw = launch_gateway(tmp_path, home, {**WATCHDOG, **model_config(max_concurrent_requests=4)})
    hung = None
    try:
        gw.openai().chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=4)
        hung = gw.replica()["pid"]
        events: list[str] = []
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            with gw.http_stream("/v1/chat/completions", {
                    "model": "smollm2", "messages": COUNTING, "temperature": 0, "max_tokens": 400,
                    "ignore_eos": True, "stream": True}, timeout=BOUND_SECONDS * 4) as stream:
                for event in stream:
                    events.append(event)
                    if len(events) == 2:  # the stream flows: now a plain request joins it, then the hang
                        plain = pool.submit(gw.http, "POST", "/v1/chat/completions", timeout=BOUND_SECONDS * 4, json={
                            "model": "smollm2", "messages": COUNTING, "max_tokens": 400, "ignore_eos": True})
                        wait_for(lambda: gw.replica()["in_flight"] == 2, 30, "both requests in flight")
                        os.kill(hung, signal.SIGSTOP)
                        stopped_at = time.monotonic()
            ended_after = time.monotonic() - stopped_at
            answer = plain.result(timeout=BOUND_SECONDS * 2)
        assert ended_after < BOUND_SECONDS, f"the stream hung {ended_after:.1f} s"
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["type"] == "service_unavailable"
        # the plain request had sent nothing back: it is either refused (503) or, sent again
        # once the hung worker's connection was found dead, held and answered by its restart
        if answer.status_code == 200:
            assert answer.json()["usage"]["completion_tokens"] == 400, answer.text
        else:
            assert answer.status_code == 503 and answer.json()["error"]["message"], answer.text
        assert f"worker pid {hung} is hung" in gw.log_path.read_text()
        reply = gw.openai().chat.completions.create(model="smollm2", messages=CAPITAL, temperature=0, max_tokens=24)
        assert "Berlin" in reply.choices[0].message.content
        assert gw.replica()["pid"] not in (None, hung)
        wait_for(lambda: gone(hung), 10, f"the hung worker {hung} to be gone")
    finally:
        if hung is not None:
            resume_and_kill(hung)
        gw.stop()


@pytest.mark.timeout(300)
def test_a_busy_worker_answers_its_probes_and_is_left_alone(home, tmp_path):
    """A long stream on a watched worker, probed every second: never taken for hung."""
    gw = launch_gateway(tmp_path, home, {**WATCHDOG, **model_config()})
    try:
        with gw.http_stream("/v1/chat/completions", {
                "model": "smollm2", "messages": COUNTING, "temperature": 0, "max_tokens": 150,
                "ignore_eos": True, "stream": True}) as stream:
            events = list(stream)
        assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1])
        assert "hung" not in gw.log_path.read_text()
    finally:
        gw.stop()


@pytest.mark.timeout(300)
def test_a_killed_zygote_is_restarted_and_forks_the_next_worker(home, tmp_path):
    gw = launch_gateway(tmp_path, home, model_config())
    try:
        first = wait_for(lambda: zygote_pids(gw.proc.pid), 30, "the zygote process")[0]
        wait_for(lambda: f"zygote pid {first} ready" in gw.log_path.read_text(), 120, "the zygote to be ready")
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: f"zygote pid {first} exited" in gw.log_path.read_text(), 30, "the zygote's death logged")
        second = wait_for(lambda: [p for p in zygote_pids(gw.proc.pid) if p != first], 30, "a new zygote")[0]
        wait_for(lambda: f"zygote pid {second} ready" in gw.log_path.read_text(), 120, "the new zygote to be ready")
        gw.openai().chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=4)
        worker = gw.replica()["pid"]
        assert psutil.Process(worker).ppid() == second  # forked by the new zygote, not spawned
        assert f"worker pid {worker} forked by the zygote" in gw.log_path.read_text()
    finally:
        gw.stop()


@pytest.mark.timeout(300)
def test_a_worker_silent_past_the_read_timeout_is_a_504(home, tmp_path):
    """The watchdog off, a 5 s read timeout: a stopped worker's plain request and stream are
    each a 504 in OpenAI's shape, before any stream header; resumed, it answers again."""
    gw = launch_gateway(tmp_path, home, {"worker_health_interval": -1, "worker_read_timeout": "5s",
                                         **model_config()})
    stopped = None
    short = {"model": "smollm2", "messages": CAPITAL, "max_tokens": 4}
    try:  # a fresh worker's first answers can take seconds on a loaded 2-core box
        wait_for(lambda: gw.http("POST", "/v1/chat/completions", json=short).status_code == 200, 120, "an answer")
        stopped = gw.replica()["pid"]
        os.kill(stopped, signal.SIGSTOP)
        for stream in (False, True):
            began = time.monotonic()
            r = gw.http("POST", "/v1/chat/completions", timeout=60, json={**short, "stream": stream})
            assert r.status_code == 504, r.text
            assert r.json()["error"]["code"] == "timeout" and time.monotonic() - began < 20
        os.kill(stopped, signal.SIGCONT)
        wait_for(lambda: gw.http("POST", "/v1/chat/completions", json=short).status_code == 200, 60, "an answer")
        assert gw.replica()["pid"] == stopped  # not restarted: only the watchdog restarts workers
    finally:
        if stopped is not None:
            resume_and_kill(stopped)
        gw.stop()
