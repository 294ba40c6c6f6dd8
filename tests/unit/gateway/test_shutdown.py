"""GracefulShutdown (gateway/shutdown.py) on plain ASGI apps: what a request gets when it comes
during the drain, when it finishes within the grace, and when the grace runs out."""

from __future__ import annotations

import asyncio
import json

import pytest

from dormant.config import ConfigError, load_config
from dormant.gateway.shutdown import GracefulShutdown

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(10)]

SCOPE = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Client:
    """One request through `app`: the messages it sent back."""

    def __init__(self, app) -> None:
        self.sent: list[dict] = []
        self.task = asyncio.ensure_future(app(SCOPE, self._receive, self._send))

    async def _receive(self) -> dict:
        await asyncio.Event().wait()  # the client neither sends more nor leaves
        return {}

    async def _send(self, message: dict) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return self.sent[0]["status"]

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent[1:])

    @property
    def ended(self) -> bool:
        return bool(self.sent) and not self.sent[-1].get("more_body", False) and self.sent[-1]["type"] == "http.response.body"


def streaming_app(release: asyncio.Event):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
        await send({"type": "http.response.body", "body": b'data: {"choices": []}\n\n', "more_body": True})
        await release.wait()
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
    return app


def plain_app(release: asyncio.Event):
    async def app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})
    return app


async def until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.001)


async def test_a_stream_open_past_the_grace_ends_with_an_error_event_and_done():
    drain = GracefulShutdown(streaming_app(asyncio.Event()))
    client = Client(drain)
    await until(lambda: len(client.sent) == 2)
    await drain.run(grace=0.05)
    assert client.task.done() and client.ended
    events = client.body.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    error = json.loads(events[-3].removeprefix(b"data: "))["error"]
    assert error["code"] == "server_shutting_down" and error["type"] == "service_unavailable"


async def test_a_request_whose_headers_are_not_out_gets_503_with_retry_after():
    drain = GracefulShutdown(plain_app(asyncio.Event()))
    client = Client(drain)
    await until(lambda: drain._open)
    await drain.run(grace=0.05)
    assert client.status == 503 and client.ended
    headers = dict(client.sent[0]["headers"])
    assert headers[b"retry-after"] == b"5" and headers[b"connection"] == b"close"
    assert set(json.loads(client.body)["error"]) == {"message", "type", "param", "code"}


async def test_new_requests_get_503_while_those_in_flight_finish_within_the_grace():
    release = asyncio.Event()
    drain = GracefulShutdown(streaming_app(release))
    first = Client(drain)
    await until(lambda: len(first.sent) == 2)
    draining = asyncio.ensure_future(drain.run(grace=5))
    await until(lambda: drain.is_draining)
    late = Client(drain)
    await late.task
    assert late.status == 503
    release.set()
    await asyncio.wait_for(draining, 1)  # returns once the last one finished, not after 5 s
    assert first.body.endswith(b"data: [DONE]\n\n") and b"error" not in first.body


async def test_a_cancellation_from_elsewhere_is_not_swallowed():
    drain = GracefulShutdown(plain_app(asyncio.Event()))
    client = Client(drain)
    await until(lambda: drain._open)
    client.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await client.task
    assert not drain._open


def test_shutdown_grace_is_a_duration_and_never_negative(tmp_path):
    path = tmp_path / "dormant.yaml"
    path.write_text("shutdown_grace: 30s\n")
    assert load_config(path).shutdown_grace == 30.0
    assert load_config(path, shutdown_grace="0").shutdown_grace == 0.0
    assert load_config().shutdown_grace == 10.0
    with pytest.raises(ConfigError, match="shutdown_grace"):
        load_config(path, shutdown_grace="-1")
