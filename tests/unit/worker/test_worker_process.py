"""A real worker process on a free loopback port, driven with the openai SDK."""

import socket
import subprocess
import sys
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def worker(model_dir):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dormant.worker", "--source", str(model_dir), "--model-id", "smol",
         "--port", str(port), "--engine-args", '{"max_model_len": 512}'],
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:  # wait on the health condition, polling
        assert proc.poll() is None, "worker exited during startup"
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "worker not healthy in 120 s"
        time.sleep(0.1)
    yield base
    proc.terminate()
    assert proc.wait(timeout=30) is not None


@pytest.fixture
def client(worker):
    from openai import OpenAI

    return OpenAI(base_url=f"{worker}/v1", api_key="unused")


Q = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.timeout(180)
def test_chat(client):
    r = client.chat.completions.create(model="smol", messages=Q, temperature=0, max_tokens=24)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == ["smol"]


@pytest.mark.timeout(180)
def test_stream_with_usage_and_stop(client):
    chunks = list(client.chat.completions.create(
        model="smol", messages=Q, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True}, stop=[" Paris"],
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The capital of France is"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


@pytest.mark.timeout(180)
def test_completions_length_and_stop(client):
    r = client.completions.create(model="smol", prompt="The capital of France is", temperature=0, max_tokens=4)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    r = client.completions.create(model="smol", prompt="The capital of France is", temperature=0, max_tokens=16, stop=".")
    assert r.choices[0].finish_reason == "stop" and "." not in r.choices[0].text


@pytest.mark.timeout(180)
def test_prompt_too_long_is_400(client):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smol", prompt="hello " * 600, max_tokens=4)
    assert e.value.body["type"] == "invalid_request_error"


@pytest.mark.timeout(180)
def test_sleep_wake_and_request_while_asleep(worker, client):
    assert httpx.post(f"{worker}/sleep", params={"level": 1}, timeout=60).status_code == 200
    assert httpx.get(f"{worker}/is_sleeping").json() == {"is_sleeping": True}
    stats = httpx.get(f"{worker}/stats").json()
    assert stats["is_sleeping"] and stats["weights_bytes"] > 0
    r = client.chat.completions.create(model="smol", messages=Q, temperature=0, max_tokens=24)
    assert "Paris" in r.choices[0].message.content
    assert httpx.get(f"{worker}/is_sleeping").json() == {"is_sleeping": False}


@pytest.mark.timeout(180)
def test_out_of_range_token_ids_are_400_and_the_worker_lives(worker, client):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="smol", prompt=[1, 2, 10**9], max_tokens=4)
    assert err.value.body["param"] == "prompt"
    # the engine loop survived: a normal request still answers
    ok = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert ok.choices[0].text
