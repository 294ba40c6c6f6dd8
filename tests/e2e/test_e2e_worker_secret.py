"""Issue 15, item 3, against a live gateway and worker: a worker's port answers only the gateway
that started it. Anyone else (without the worker's secret, with a wrong one, or with the
gateway's own API key) gets 401 on the control and the completion routes, and the model still
answers through the gateway afterwards. Both ways a worker starts: forked by the zygote, and
spawned plainly."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from e2e_harness import launch_gateway, model_config, wait_for

KEY = "sk-e2e-worker-secret"
PROMPT = {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
STRANGERS = {"none": {}, "wrong secret": {"Authorization": "Bearer not-the-secret"},
             "the gateway's key": {"Authorization": f"Bearer {KEY}"}}


@pytest.fixture(scope="module", params=[True, False], ids=["forked", "spawned"])
def gw(request, home, module_workdir):
    forked = request.param
    config = {**model_config(), "zygote": forked}
    gateway = launch_gateway(module_workdir / ("forked" if forked else "spawned"), home, config, key=KEY)
    gateway.forked = forked
    if forked:  # a start before the zygote is up spawns instead
        wait_for(lambda: "zygote pid" in gateway.log_path.read_text(), 180, "the zygote", interval=0.2)
    yield gateway
    gateway.stop()


def _assert_refused(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "authentication_error", err


@pytest.mark.timeout(300)
def test_a_worker_refuses_everyone_but_its_gateway(gw):
    r = gw.http("POST", "/v1/completions", json=PROMPT)
    assert r.status_code == 200, r.text
    answer = r.json()["choices"][0]["text"]
    replica = gw.wait_state("ready", timeout=30)
    # /running reads the worker's /stats with the secret: its memory and its own view are known
    assert replica["memory_bytes"] and replica["memory_bytes"] > 0, replica
    assert replica["worker_stats"]["pid"] == replica["pid"] and not replica["worker_stats"]["is_sleeping"]
    worker = f"http://127.0.0.1:{replica['port']}"
    if gw.forked:
        assert f"worker pid {replica['pid']} forked by the zygote" in gw.log_path.read_text()
    # the secret is handed over in the environment, never on the command line (ps shows it to all)
    argv = Path(f"/proc/{replica['pid']}/cmdline").read_bytes().split(b"\0")
    assert not any(b"token" in a.lower() or b"secret" in a.lower() for a in argv), argv

    for who, headers in STRANGERS.items():
        _assert_refused(httpx.post(worker + "/sleep", params={"level": "2"}, headers=headers, timeout=10))
        _assert_refused(httpx.post(worker + "/v1/completions", json=PROMPT, headers=headers, timeout=10))
        _assert_refused(httpx.post(worker + "/v1/chat/completions", headers=headers, timeout=10,
                                   json={"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}))
        for path in ("/wake_up", "/hibernate"):
            _assert_refused(httpx.post(worker + path, headers=headers, timeout=10))
        for path in ("/stats", "/is_sleeping", "/v1/models"):
            _assert_refused(httpx.get(worker + path, headers=headers, timeout=10))
    assert httpx.get(worker + "/health", timeout=10).status_code == 200  # open: it says nothing

    # nothing the strangers sent took effect: the same worker, awake, answers as before
    after = gw.replica()
    assert (after["state"], after["pid"]) == ("ready", replica["pid"]), after
    assert after["worker_stats"]["is_sleeping"] is False
    r = gw.http("POST", "/v1/completions", json=PROMPT)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == answer
    assert gw.replica()["pid"] == replica["pid"]
