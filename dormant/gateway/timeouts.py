"""Client timeouts at the HTTP edge: idle, header and body (issue 15, item 10).

A client holds a connection, and the memory of what it sent so far, only for as long as it is
sending a request at a fair pace. uvicorn (h11) bounds the wait between two requests on a
keep-alive connection (`timeout_keep_alive`) and the size of a request head
(`h11_max_incomplete_event_size`, 16 KiB), but not the time a head or a body may take: one
byte every few seconds (slowloris) held a connection forever, and a fresh connection that
never sent a byte was never closed. What it lacks is built here:

* `timed_protocol(header, body)`: uvicorn's h11 protocol, plus a deadline on each request
  head, counted from the connection's opening (a first request) or from the first byte of the
  request (the next ones on a keep-alive connection). A head still incomplete then is answered
  408 and the connection closed; a connection that never sent a byte is just closed. It also
  closes a connection whose body is still coming in after the body limit (and a little slack
  for `BodyDeadline` to answer first): the app answered without reading it (a 401, say), and
  uvicorn would go on discarding it, byte by byte, for ever.
* `BodyDeadline` (ASGI middleware): a request whose whole body is not in within `seconds` of
  its head is answered 408 with `Connection: close`, from the route that was reading it.

Idle keep-alive connections are uvicorn's own `timeout_keep_alive` (the gateway passes
`client_idle_timeout` to it). A limit of -1 (durations.NEVER) turns that bound off.
"""

from __future__ import annotations

import asyncio
import json
import math

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from dormant.errors import DormantError

# BodyDeadline answers 408 at the limit; the protocol closes a body still coming in this much later
BODY_BACKSTOP_SLACK_SECONDS = 1.0


class RequestTimeout(DormantError):
    status_code = 408
    error_type = "invalid_request_error"
    code = "request_timeout"

    def headers(self) -> dict[str, str]:
        # the rest of the request is unread: this connection cannot carry another one
        return {"Connection": "close"}


def as_seconds(limit: float) -> float:
    """A configured limit as seconds to wait: -1 (never) is infinity."""
    return math.inf if limit < 0 else limit


def _timeout_response(message: str) -> bytes:
    """A whole HTTP/1.1 408 response, for a request whose head never arrived: no ASGI app
    runs for it, so it is written as bytes, in OpenAI's error shape."""
    body = json.dumps(RequestTimeout(message).to_openai_body()).encode()
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


def timed_protocol(header_timeout: float, body_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline on each request head and a backstop on its body
    (limits in seconds, -1: none); pass it as uvicorn.Config(http=...)."""
    header_seconds = as_seconds(header_timeout)
    body_seconds = as_seconds(body_timeout) + BODY_BACKSTOP_SLACK_SECONDS

    class TimedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _body_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_timer = self._arm(header_seconds, self._head_too_slow)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch(has_new_bytes=bool(data))

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch(has_new_bytes=False)  # a pipelined request may have been parsed

        def connection_lost(self, exc: Exception | None) -> None:
            self._header_timer = self._cancel(self._header_timer)
            self._body_timer = self._cancel(self._body_timer)
            super().connection_lost(exc)

        def _watch(self, has_new_bytes: bool) -> None:
            """Arm or disarm the deadlines from where the client is in its request (h11's view)."""
            state = self.conn.their_state
            if state is h11.IDLE:  # between requests, or inside a head
                self._body_timer = self._cancel(self._body_timer)
                if has_new_bytes and self._header_timer is None:
                    self._header_timer = self._arm(header_seconds, self._head_too_slow)
                return
            self._header_timer = self._cancel(self._header_timer)
            if state is h11.SEND_BODY:
                if self._body_timer is None:
                    self._body_timer = self._arm(body_seconds, self._body_too_slow)
            else:
                self._body_timer = self._cancel(self._body_timer)

        def _head_too_slow(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.conn.trailing_data[0]:  # part of a head came: say why it is refused
                self.transport.write(_timeout_response(
                    f"The request head was not complete within {header_timeout:g} s "
                    "(setting `client_header_timeout`)."))
            self.logger.info("closed a connection whose request head did not arrive within %g s", header_timeout)
            self.transport.close()

        def _body_too_slow(self) -> None:
            self._body_timer = None
            if not self.transport.is_closing() and self.conn.their_state is h11.SEND_BODY:
                self.logger.info("closed a connection whose request body did not arrive within %g s", body_timeout)
                self.transport.close()

        def _arm(self, seconds: float, callback) -> asyncio.TimerHandle | None:
            return None if math.isinf(seconds) else self.loop.call_later(seconds, callback)

        @staticmethod
        def _cancel(timer: asyncio.TimerHandle | None) -> None:
            if timer is not None:
                timer.cancel()

    return TimedH11Protocol


class BodyDeadline:
    """408 for a request whose body is not all in within `seconds` of its head (-1: no bound).

    Only the body is timed: once its last part is in, `receive` is passed through untouched
    (the gateway then awaits it to learn that the client left, for as long as a stream runs).
    """

    def __init__(self, app, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.seconds < 0:
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        is_body_in = False

        async def timed_receive():
            nonlocal is_body_in
            if is_body_in:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise RequestTimeout(f"The request body was not complete within {self.seconds:g} s "
                                     "(setting `client_body_timeout`).") from None
            is_body_in = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)
