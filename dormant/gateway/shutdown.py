"""Graceful shutdown at the HTTP edge (issue 15, item 9).

    drain = GracefulShutdown(app)       # ASGI middleware: it sees every request in flight
    await drain.run(grace)              # on SIGTERM, before uvicorn closes its listener

From `run` on, a new request is answered 503 in OpenAI's shape with Retry-After and
`Connection: close` (the listener stays open meanwhile: a refused connection tells a client
less than a 503 does). Requests in flight get `grace` seconds to finish; then each one still
open is cancelled, which closes its connection to the worker (the worker aborts the
generation), and its response is ended cleanly: a stream with an error event and
`data: [DONE]`, a request whose headers have not gone out with the same 503. Only then do
the workers stop (the lifespan's exit).
"""

from __future__ import annotations

import asyncio
import json
import logging

from dormant.errors import ModelUnavailable
from dormant.gateway.responses import error_event
from dormant.protocol import SSE_DONE

log = logging.getLogger("dormant.gateway")

SHUTTING_DOWN_RETRY_AFTER_SECONDS = 5
# how long a cancelled request may take to send its last bytes and release its worker
CUT_SECONDS = 2.0


def _shutting_down() -> ModelUnavailable:
    return ModelUnavailable("the server is shutting down; retry shortly", code="server_shutting_down",
                            retry_after=SHUTTING_DOWN_RETRY_AFTER_SECONDS)


class _Reply:
    """One request's `send`, watched: whether its headers went out, as SSE, and whether it ended."""

    def __init__(self, send) -> None:
        self._send = send
        self.is_cut = False
        self.has_started = False
        self.is_event_stream = False
        self.has_ended = False

    async def send(self, message) -> None:
        if message["type"] == "http.response.start":
            self.has_started = True
            content_type = dict(message.get("headers") or []).get(b"content-type", b"")
            self.is_event_stream = content_type.startswith(b"text/event-stream")
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.has_ended = True
        await self._send(message)

    async def finish(self) -> None:
        """End a response the cut left open."""
        if not self.has_started:
            await send_error(self.send)
        elif not self.has_ended:
            tail = error_event(_shutting_down()) + SSE_DONE if self.is_event_stream else b""
            await self.send({"type": "http.response.body", "body": tail, "more_body": False})


async def send_error(send) -> None:
    exc = _shutting_down()
    body = json.dumps(exc.to_openai_body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")] + [(k.lower().encode(), v.encode()) for k, v in exc.headers().items()]
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class GracefulShutdown:
    def __init__(self, app) -> None:
        self.app = app
        self.is_draining = False
        self._open: dict[asyncio.Task, _Reply] = {}
        self._none_open = asyncio.Event()
        self._none_open.set()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.is_draining:
            return await send_error(send)
        task, reply = asyncio.current_task(), _Reply(send)
        self._open[task] = reply
        self._none_open.clear()
        try:
            try:
                await self.app(scope, receive, reply.send)
            except asyncio.CancelledError:
                if not reply.is_cut:
                    raise
                task.uncancel()  # our own cut: this request still owes its client an ending
            if reply.is_cut:
                await reply.finish()
        finally:
            del self._open[task]
            if not self._open:
                self._none_open.set()

    async def run(self, grace: float) -> None:
        """Refuse new requests; give those in flight `grace` seconds, then end them."""
        self.is_draining = True
        if self._open:
            log.info("shutting down: %d request(s) in flight get %g s to finish", len(self._open), grace)
        if await self._wait_none_open(grace):
            return
        log.warning("shutting down: ending %d request(s) still open after %g s", len(self._open), grace)
        for task, reply in list(self._open.items()):
            reply.is_cut = True
            task.cancel()
        await self._wait_none_open(CUT_SECONDS)

    async def _wait_none_open(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._none_open.wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False
