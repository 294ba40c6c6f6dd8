"""Client mistakes at the gateway, in-process (no worker starts: each is refused before one).

Issue 15: item 7 (400s in OpenAI's shape with `param`, never 500), item 1 (413 for big
bodies), item 6 (`keep_alive` that overflows or is NaN)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from dormant.config import ModelSpec, ServerConfig
from dormant.durations import NEVER
from dormant.gateway import routes
from dormant.gateway.server import create_app
from dormant.errors import InvalidRequest

KEY = "sk-unit-test-key"
LIMIT = 4096
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def client():
    cfg = ServerConfig(api_keys=(KEY,), max_request_body_bytes=LIMIT,
                       models=(ModelSpec(id="smollm2", source="builtin:smollm2"),))
    with TestClient(create_app(cfg), headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def _assert_400(r, param: str | None) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param


@pytest.mark.timeout(30)
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("raw,param", [
    (b'{"model": "smollm2", "prompt": "hi", "seed": 9223372036854775808}', "seed"),
    (b'{"model": "smollm2", "prompt": "hi", "seed": -9223372036854775809}', "seed"),
    (b'{"model": "smollm2", "prompt": ""}', "prompt"),
    (b'{"model": "smollm2", "prompt": []}', "prompt"),
    (b'{"model": "smollm2", "prompt": [""]}', "prompt"),
    (b'{"model": "smollm2", "prompt": "\\ud800"}', "prompt"),
    (b'{"model": "smollm2", "prompt": ["ok \\udfff"]}', "prompt[0]"),
    (b'{"model": "smollm2", "prompt": "hi", "user": "x\\ud83d"}', "user"),
    (b'{"model": "smollm2", "prompt": "hi", "temperature": NaN}', "temperature"),
    (b'{"model": "smollm2", "prompt": "hi", "keep_alive": 1e400}', "keep_alive"),
    (b'{"model": "smollm2", "prompt": "hi", "keep_alive": NaN}', "keep_alive"),
    (b'{"model": "smollm2", "prompt": "hi", "keep_alive": "NaN"}', "keep_alive"),
])
def test_client_mistakes_are_400_naming_the_param(client, raw, param, stream):
    raw = raw[:-1] + (b', "stream": true}' if stream else b"}")
    r = client.post("/v1/completions", content=raw, headers=JSON)
    assert not r.headers["content-type"].startswith("text/event-stream")  # decided before a stream
    _assert_400(r, param)


@pytest.mark.timeout(30)
def test_chat_surrogate_is_named_by_its_path(client):
    raw = b'{"model": "smollm2", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "\\ud800"}]}'
    _assert_400(client.post("/v1/chat/completions", content=raw, headers=JSON), "messages[1].content")
    ok = b'{"model": "nope", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'  # a pair is text
    assert client.post("/v1/chat/completions", content=ok, headers=JSON).status_code == 404


@pytest.mark.timeout(30)
def test_json_nested_very_deep_is_400_without_recursing(client):
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 2000 + b"1" + b"}" * 2000):
        # within the byte limit of a default gateway: the depth check, not the size, refuses it
        app = create_app(ServerConfig(models=(ModelSpec(id="smollm2", source="builtin:smollm2"),)))
        with TestClient(app) as big:
            _assert_400(big.post("/v1/chat/completions", content=raw, headers=JSON), None)
    nested_ok = {**CHAT, "metadata": {"a": {"b": {"c": [[[1]]]}}}, "model": "nope"}
    assert client.post("/v1/chat/completions", json=nested_ok).status_code == 404


@pytest.mark.timeout(30)
def test_body_over_the_limit_is_413(client):
    body = b'{"model": "smollm2", "prompt": "' + b"x" * LIMIT + b'"}'
    r = client.post("/v1/completions", content=body, headers=JSON)  # Content-Length: refused unread
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    def chunks():  # no Content-Length: counted while read
        for i in range(0, len(body), 1000):
            yield body[i:i + 1000]

    r = client.post("/v1/completions", content=chunks(), headers=JSON)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    assert client.post("/v1/completions", json={"model": "nope", "prompt": "x" * 100}).status_code == 404


@pytest.mark.timeout(30)
def test_unauthenticated_big_body_is_401(client):
    r = client.post("/v1/completions", content=b"x" * (LIMIT * 2), headers={"Authorization": ""})
    assert r.status_code == 401


@pytest.mark.parametrize("value,seconds", [
    ("99999999999h", NEVER), (1e30, NEVER), ("1e30", None), (-5, NEVER), (-1, NEVER), ("5m", 300.0), (0, 0.0),
])
def test_keep_alive_is_clamped_or_refused(value, seconds):
    if seconds is None:
        with pytest.raises(InvalidRequest) as err:
            routes._keep_alive(value)
        assert err.value.param == "keep_alive"
    else:
        assert routes._keep_alive(value) == seconds
    with pytest.raises(InvalidRequest):
        routes._keep_alive(float("nan"))
