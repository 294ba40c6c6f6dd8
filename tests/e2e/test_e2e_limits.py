"""Admission limits and auth against a live gateway: 429 with Retry-After, 401 with WWW-Authenticate."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from e2e_harness import launch_gateway, model_config, wait_for

COUNTING = [{"role": "user", "content": "Count from 1 to 300, separated by commas."}]
KEY = "sk-test-dormant-0123456789"


@pytest.fixture(scope="module")
def gw(home, module_workdir):
    gateway = launch_gateway(module_workdir, home, model_config(max_concurrent_requests=1, max_queue=0),
                             key=KEY)
    yield gateway
    gateway.stop()


@pytest.mark.timeout(60)
def test_missing_or_wrong_key_is_401(gw, openapi_validate):
    for client in (openai.OpenAI(base_url=gw.base_url + "/v1", api_key="wrong", max_retries=0),):
        with pytest.raises(openai.AuthenticationError) as err:
            client.models.list()
        openapi_validate("ErrorResponse", err.value.response.json())
        assert err.value.response.headers["WWW-Authenticate"].startswith("Bearer")
    for path in ("/v1/models", "/metrics", "/running"):
        assert httpx.get(gw.base_url + path).status_code == 401, path
    assert httpx.post(gw.base_url + "/unload").status_code == 401
    assert httpx.get(gw.base_url + "/health").status_code == 200  # open
    assert [m.id for m in gw.openai().models.list()] == ["smollm2"]


@pytest.mark.timeout(300)
def test_queue_full_is_429_with_retry_after(gw, openapi_validate):
    gw.openai().chat.completions.create(model="smollm2", messages=COUNTING, temperature=0, max_tokens=1)
    events: list[str] = []

    def long_stream() -> None:
        with gw.http_stream("/v1/chat/completions", {
                "model": "smollm2", "messages": COUNTING, "temperature": 0, "max_tokens": 60,
                "stream": True}) as stream:
            events.extend(stream)

    t = threading.Thread(target=long_stream)
    t.start()
    wait_for(lambda: gw.replica()["in_flight"] == 1 or not t.is_alive(), 30, "the first request running")
    with pytest.raises(openai.RateLimitError) as err:
        gw.openai().chat.completions.create(model="smollm2", messages=COUNTING, temperature=0, max_tokens=120)
    t.join(timeout=240)
    response = err.value.response
    openapi_validate("ErrorResponse", response.json())
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert events[-1] == "[DONE]"
