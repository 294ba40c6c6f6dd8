"""The shared parts in-process: the relay's stream rewriting, error shapes by path, x-api-key,
CORS (`allowed_origins`), and refusals before any worker is started."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from dormant.config import ConfigError, ModelSpec, ServerConfig, _origins
from dormant.gateway.apis import anthropic, ollama, relay
from dormant.gateway.server import create_app

KEY = "sk-unit-apis"


def test_relay_rewrites_keepalives_chunks_and_an_error_event():
    async def proxied():
        for event in [b": loading\n\n", b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n',
                      b'data: {"error":{"message":"worker died","type":"service_unavailable","param":null,'
                      b'"code":"model_unavailable"}}\n\n', b"data: [DONE]\n\n"]:
            yield event

    async def collect():
        return [e async for e in relay.translated(proxied(), anthropic.MessageStream("m", "msg_1"))]

    frames = asyncio.run(collect())
    kinds = [f.split(b"\n", 1)[0].decode() for f in frames]
    assert kinds == ["event: ping", "event: message_start", "event: content_block_start",
                     "event: content_block_delta", "event: error"]
    assert b'"overloaded_error"' in frames[-1] and b"worker died" in frames[-1]


def test_relay_stops_at_done_and_finishes():
    async def proxied():
        yield b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
        yield b"data: [DONE]\n\n"

    async def collect():
        return [e async for e in relay.translated(proxied(), ollama.OllamaStream("m", True, 0.0))]

    assert [b'"done":false' in f for f in asyncio.run(collect())] == [True, False]


@pytest.fixture
def client():
    cfg = ServerConfig(api_keys=(KEY,), allowed_origins=("https://ok.example",),
                       models=(ModelSpec(id="smollm2", source="builtin:smollm2"),))
    with TestClient(create_app(cfg)) as c:
        yield c


def test_errors_take_the_shape_of_their_api(client):
    anth = client.post("/v1/messages", headers={"x-api-key": KEY}, json={"model": "smollm2", "messages": []})
    assert anth.status_code == 400 and anth.json()["type"] == "error"
    assert anth.json()["error"]["type"] == "invalid_request_error"
    oll = client.post("/api/chat", headers={"x-api-key": KEY}, json={"model": "nope", "messages": [
        {"role": "user", "content": "x"}]})
    assert oll.status_code == 404 and isinstance(oll.json()["error"], str)
    oa = client.post("/v1/responses", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": "smollm2", "input": "x", "background": True})
    assert oa.status_code == 400 and oa.json()["error"]["param"] == "background"
    assert client.post("/v1/messages", json={}).json()["error"]["type"] == "authentication_error"
    tags = client.get("/api/tags")
    assert tags.status_code == 401 and list(tags.json()) == ["error"] and isinstance(tags.json()["error"], str)


@pytest.mark.parametrize("method,path", [
    ("POST", "/v1/responses"), ("POST", "/v1/messages"), ("POST", "/api/chat"), ("POST", "/api/generate"),
    ("GET", "/api/tags"), ("GET", "/api/ps"), ("POST", "/api/show"), ("GET", "/api/version"),
    ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/version"), ("GET", "/v1/models/smollm2"),
])
def test_every_api_is_behind_the_key(client, method, path):
    r = client.request(method, path, json={"model": "smollm2"})
    assert r.status_code == 401, r.text  # with the key each answers (test_e2e_apis.py)


def test_x_api_key_is_a_key_and_a_wrong_one_is_not(client):
    assert client.get("/version", headers={"x-api-key": KEY}).status_code == 200
    assert client.get("/version", headers={"x-api-key": "wrong"}).status_code == 401
    assert client.get("/version", headers={"Authorization": "Bearer wrong", "x-api-key": KEY}).status_code == 401


def test_cors_preflight_for_allowed_origins_only(client):
    ask = {"Access-Control-Request-Method": "POST"}
    ok = client.options("/v1/messages", headers={"Origin": "https://ok.example", **ask})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://ok.example"
    bad = client.options("/v1/messages", headers={"Origin": "https://bad.example", **ask})
    assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers


def test_cors_is_off_by_default():
    cfg = ServerConfig(api_keys=(KEY,), models=(ModelSpec(id="smollm2", source="builtin:smollm2"),))
    with TestClient(create_app(cfg)) as c:
        r = c.get("/version", headers={"Origin": "https://ok.example", "x-api-key": KEY})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("value", ["https://a.example/", "a.example", [""], 5])
def test_allowed_origins_must_be_origins(value):
    with pytest.raises(ConfigError, match="allowed_origins"):
        _origins(value)
