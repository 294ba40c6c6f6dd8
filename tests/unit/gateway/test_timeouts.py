"""The client timeout settings (config.py) and BodyDeadline (gateway/timeouts.py) on a plain
ASGI app; the real-socket behaviour is tests/e2e/test_e2e_client_timeouts.py."""

from __future__ import annotations

import asyncio

import pytest

from dormant.config import ConfigError, load_config
from dormant.gateway.timeouts import BodyDeadline, RequestTimeout

pytestmark = pytest.mark.timeout(10)
KEYS = ("client_header_timeout", "client_body_timeout", "client_idle_timeout")


def test_defaults_and_durations(tmp_path):
    cfg = load_config()
    assert (cfg.client_header_timeout, cfg.client_body_timeout, cfg.client_idle_timeout) == (10.0, 60.0, 30.0)
    path = tmp_path / "dormant.yaml"
    path.write_text("client_header_timeout: 5s\nclient_body_timeout: 2m\nclient_idle_timeout: -1\n")
    cfg = load_config(path)
    assert (cfg.client_header_timeout, cfg.client_body_timeout, cfg.client_idle_timeout) == (5.0, 120.0, -1.0)


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("value", ["0", "soon", "[1]"])
def test_a_bad_value_names_its_key(tmp_path, key, value):
    path = tmp_path / "dormant.yaml"
    path.write_text(f"{key}: {value}\n")
    with pytest.raises(ConfigError, match=key):
        load_config(path)


def _receive_from(parts: list[tuple[bytes, bool]], gap: float):
    async def receive() -> dict:
        if not parts:
            await asyncio.Event().wait()  # the body is in; the client stays
        await asyncio.sleep(gap)
        body, more = parts.pop(0)
        return {"type": "http.request", "body": body, "more_body": more}
    return receive


async def _read_all(app, receive) -> bytes:
    got = b""

    async def inner(scope, receive, send):
        nonlocal got
        while True:
            message = await receive()
            got += message["body"]
            if not message["more_body"]:
                return

    await BodyDeadline(inner, app)({"type": "http"}, receive, None)
    return got


def test_a_body_in_time_passes_and_a_slow_one_is_refused():
    fast = _receive_from([(b"ab", True), (b"c", False)], gap=0.01)
    assert asyncio.run(_read_all(1.0, fast)) == b"abc"
    slow = _receive_from([(b"a", True)] * 100 + [(b"", False)], gap=0.05)
    with pytest.raises(RequestTimeout) as caught:
        asyncio.run(_read_all(0.3, slow))
    assert caught.value.status_code == 408 and caught.value.headers() == {"Connection": "close"}


def test_after_the_body_receive_is_not_timed():
    """The gateway awaits `receive` for a disconnect as long as a stream runs: no deadline then."""
    parts = [(b"x", False)]

    async def inner(scope, receive, send):
        assert (await receive())["body"] == b"x"
        with pytest.raises(TimeoutError):  # the outer bound fires, not RequestTimeout
            await asyncio.wait_for(receive(), 0.5)

    asyncio.run(BodyDeadline(inner, 0.2)({"type": "http"}, _receive_from(parts, gap=0), None))
