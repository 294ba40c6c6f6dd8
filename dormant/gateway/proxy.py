"""Forward one validated OpenAI request to its replica's worker; plain or streamed.

A request first takes a place in its replica (`enter`: 429 here when the queue is full),
then waits to be admitted (held through a start or a wake), then is sent to the worker
through its worker_api.WorkerClient (`worker.client`).

A stream admitted at once opens the worker's stream before its own headers go out, so a
request the worker refuses (a token id out of range, a prompt past the context) is the
client's 400 in OpenAI's shape, as it would be unstreamed (issue 15, item 7). A stream held
through a start or a wake answers at once with SSE comment keep-alives; from then on an error,
the worker's refusal too (its type, param and code kept), can only be an error event followed
by `data: [DONE]`. Usage is asked from the worker on every stream (for the token counters) and
stripped again when the client did not ask for it.

A client that disconnects abandons its request: a stream's body is cancelled by Starlette, a
plain request by `unless_client_leaves`; either way the connection to the worker is closed,
and the worker aborts the generation (issue 15, item 2). A worker that sends no byte within its
read timeout (worker_api.WorkerClient) is a 504, or an error event on a stream (issue 15, item 5).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from dormant.disconnect import CLIENT_CLOSED_REQUEST, unless_client_leaves
from dormant.errors import DormantError, ModelUnavailable, WorkerError
from dormant.gateway.metrics import GatewayMetrics
from dormant.gateway.responses import error_event
from dormant.lifecycle.controller import ReplicaController
from dormant.lifecycle.states import Ticket
from dormant.protocol import FIRST_TOKEN_HEADER, SSE_DONE, SSE_KEEPALIVE
from dormant.worker_link import WorkerResponse

log = logging.getLogger("dormant.gateway")

KEEPALIVE_SECONDS = 2.0
# A refused connection sent nothing: the request takes a new place, held through the restart,
# at most this many times (issue 15's load test: a worker killed under load had queued requests
# admitted to it before its exit was seen, and they were lost)
MAX_REQUEUES = 3
REQUEUE_WAIT_SECONDS = 5.0  # for the refusing worker's exit, before the request re-enters
T = TypeVar("T")
# nginx's status for "the client closed the request": nobody reads it, the access log does


@dataclass
class Forward:
    """What to send where: the worker path (a worker_api.Route), the body towards it, and the
    client's wishes. `request` is the client's own, watched for a disconnect."""

    replica: ReplicaController
    path: str
    payload: dict[str, Any]
    keep_alive: float | None
    stream: bool
    client_wants_usage: bool
    request: Request | None = None


def worker_payload(body: dict[str, Any], served_id: str, stream: bool, client_wants_usage: bool) -> dict[str, Any]:
    payload = {k: v for k, v in body.items() if k != "keep_alive"}
    payload["model"] = served_id
    if stream and not client_wants_usage:
        payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
    return payload


class _Call:
    """One forwarded request: its place in the replica, the worker's response and its figures.
    `end` (once, however the request ends) leaves the replica, counts a stream in the
    metrics and closes the worker's response (unread: its connection is dropped, not pooled)."""

    def __init__(self, fwd: Forward, ticket: Ticket, arrived: float, metrics: GatewayMetrics) -> None:
        self.fwd, self.ticket, self.arrived, self._metrics = fwd, ticket, arrived, metrics
        self.model = fwd.replica.spec.id
        self.queue_s: float | None = None
        self.ttft_s: float | None = None
        self.usage: dict | None = None
        self._worker_response = contextlib.AsyncExitStack()
        self._ended = False

    async def to_worker(self, send: Callable[[Any], Awaitable[T]]) -> T:
        """`send` to the admitted worker (ModelUnavailable when the start failed). A refused
        connection means nothing was sent: the worker died and its controller has not seen the
        exit yet. The request then waits for that exit and takes a new place in the replica,
        held through the restart, instead of failing (MAX_REQUEUES times at most)."""
        for attempt in range(MAX_REQUEUES + 1):
            worker = await self.ticket.admitted
            self.queue_s = time.monotonic() - self.arrived
            try:
                return await send(worker)
            except httpx.ConnectError:
                if attempt == MAX_REQUEUES:
                    raise
                log.warning("model %s: worker pid %s refused the connection; the request waits for a restart",
                            self.model, worker.pid)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(worker.wait(), timeout=REQUEUE_WAIT_SECONDS)
                self.fwd.replica.leave(self.ticket)
                self.ticket = await self.fwd.replica.enter(self.fwd.keep_alive)
        raise AssertionError("unreachable")

    async def open_stream(self) -> WorkerResponse:
        """The worker's streamed answer, status read, body not yet: a refusal is raised as the
        worker's own error (DormantError)."""
        r = await self.to_worker(lambda worker: self._worker_response.enter_async_context(
            worker.client.stream(self.fwd.path, self.fwd.payload)))
        if r.status_code != 200:
            raise _worker_failure(self.model, r.status_code, await r.aread())
        return r

    async def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        self.fwd.replica.leave(self.ticket)  # never blocks: first, whatever cancels what follows
        if self.fwd.stream:
            self._metrics.observe_request(self.model, queue_s=self.queue_s, ttft_s=self.ttft_s,
                                          e2e_s=time.monotonic() - self.arrived, usage=self.usage,
                                          tier=self.ticket.from_tier)
        await self._worker_response.aclose()


class _Streamed(StreamingResponse):
    """SSE that ends its call however it ends, also when the client left before the first byte
    (the body then never started, so no `finally` inside it would run)."""

    def __init__(self, events: AsyncIterator[bytes], call: _Call) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._call = call

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            await self._call.end()


class Proxy:
    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    async def forward(self, fwd: Forward) -> Response:
        arrived = time.monotonic()
        ticket = await fwd.replica.enter(fwd.keep_alive)  # QueueFull -> 429 before any byte
        call = _Call(fwd, ticket, arrived, self._metrics)
        response: Response | None = None
        try:
            if fwd.stream and not ticket.admitted.done():
                response = _Streamed(_ending_in_an_error_event(self._held_stream(call), call.model), call)
            elif fwd.stream:
                response = await unless_client_leaves(fwd.request, self._stream_now(call))
            else:
                response = await unless_client_leaves(fwd.request, self._plain(call))
            return response or Response(status_code=CLIENT_CLOSED_REQUEST)
        finally:
            if not isinstance(response, _Streamed):
                await call.end()

    async def _plain(self, call: _Call) -> Response:
        try:
            r = await call.to_worker(lambda worker: worker.client.post(call.fwd.path, call.fwd.payload))
        except httpx.TimeoutException:
            raise worker_timeout(call.model) from None
        except httpx.HTTPError as exc:
            raise ModelUnavailable(f"model {call.model!r}: the worker failed while answering ({exc!r})") from None
        done, admitted = time.monotonic(), call.arrived + call.queue_s
        if r.status_code != 200:
            return Response(r.content, status_code=r.status_code, media_type="application/json")
        try:
            data = r.json()
        except ValueError:
            raise WorkerError(f"model {call.model!r}: the worker sent a response that is not JSON") from None
        self._metrics.observe_request(call.model, queue_s=admitted - call.arrived,
                                      ttft_s=plain_ttft(r, admitted - call.arrived),
                                      e2e_s=done - call.arrived, usage=data.get("usage"),
                                      tier=call.ticket.from_tier)
        return Response(r.content, media_type="application/json")  # the worker's JSON as it is

    async def _stream_now(self, call: _Call) -> Response:
        """Admitted at once: the worker's refusal (raised by open_stream) is this response's
        status and JSON body, since no header has gone out yet."""
        try:
            r = await call.open_stream()
        except httpx.TimeoutException:
            raise worker_timeout(call.model) from None
        except httpx.HTTPError as exc:
            raise ModelUnavailable(f"model {call.model!r}: the worker failed while answering ({exc!r})") from None
        return _Streamed(_ending_in_an_error_event(_relay_events(call, r), call.model), call)

    async def _held_stream(self, call: _Call) -> AsyncIterator[bytes]:
        """Held through a start or a wake: headers go out now, then keep-alives while held (the
        openai SDK ignores comments)."""
        yield SSE_KEEPALIVE
        while not call.ticket.admitted.done():
            await asyncio.wait({call.ticket.admitted}, timeout=KEEPALIVE_SECONDS)
            if not call.ticket.admitted.done():
                yield SSE_KEEPALIVE
        r = await call.open_stream()
        async for event in _relay_events(call, r):
            yield event


async def _relay_events(call: _Call, r: WorkerResponse) -> AsyncIterator[bytes]:
    """The worker's SSE events as the client gets them, up to its `data: [DONE]`. The events
    of one read go out in one write: under load a read holds several (64 streams: ~170 us of
    the gateway's time per event on the 2-core machine, much of it the write; issue 12)."""
    buffer = b""
    async for chunk in r.aiter_raw():
        buffer += chunk
        outs = []
        is_done = False
        while not is_done and b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            out, event_usage, has_token, is_done = _relay(event, call.fwd.client_wants_usage,
                                                          wants_token=call.ttft_s is None)
            call.usage = event_usage or call.usage
            if has_token and call.ttft_s is None:
                call.ttft_s = time.monotonic() - call.arrived
            if out:
                outs.append(out)
        if outs:
            yield b"".join(outs)
        if is_done:
            return
    raise httpx.RemoteProtocolError("the worker closed the stream before [DONE]")


async def _ending_in_an_error_event(events: AsyncIterator[bytes], model: str) -> AsyncIterator[bytes]:
    """`events`; once a stream's headers are out, an error can only be an event and [DONE]."""
    try:
        async with contextlib.aclosing(events):
            async for event in events:
                yield event
    except DormantError as exc:  # the start failed, or the worker refused the request
        yield error_event(exc)
        yield SSE_DONE
    except httpx.TimeoutException:
        log.warning("model %s: stream failed: the worker sent nothing within its read timeout", model)
        yield error_event(worker_timeout(model))
        yield SSE_DONE
    except httpx.HTTPError as exc:
        log.warning("model %s: stream failed: %r", model, exc)
        yield error_event(ModelUnavailable(f"model {model!r}: the worker failed mid-stream ({exc})"))
        yield SSE_DONE
    except Exception as exc:  # a bug must end this stream cleanly, not the server
        log.exception("model %s: stream failed", model)
        yield error_event(DormantError(f"internal error: {type(exc).__name__}"))
        yield SSE_DONE


def plain_ttft(response: WorkerResponse, waited: float) -> float | None:
    """A non-streamed answer's time to first token: the time the request waited here for its
    worker, plus the worker's own (its FIRST_TOKEN_HEADER). None when the header is missing or
    bad: the whole answer's time is no first-token figure."""
    try:
        worker_s = float(response.headers[FIRST_TOKEN_HEADER])
    except (KeyError, ValueError):
        return None
    return waited + worker_s if worker_s >= 0 else None


def _relay(event: bytes, client_wants_usage: bool,
           wants_token: bool = True) -> tuple[bytes | None, dict | None, bool, bool]:
    """One SSE event from the worker -> (bytes for the client or None, usage, has a token, is
    [DONE]). Once the first token was seen (`wants_token` false) an event without usage is
    passed on unparsed: the relay's cost per token is most of a stream's cost here."""
    data = event.strip()
    if not data.startswith(b"data:"):
        return event + b"\n\n", None, False, False  # comments and other fields pass through
    text = data[len(b"data:"):].strip()
    if text == b"[DONE]":
        return SSE_DONE, None, False, True
    if not wants_token and not _may_hold_usage(text):
        return event + b"\n\n", None, False, False
    try:
        obj = json.loads(text)
    except ValueError:
        return event + b"\n\n", None, False, False
    usage = obj.get("usage") if isinstance(obj, dict) else None
    choices = obj.get("choices") if isinstance(obj, dict) else None
    has_token = bool(choices) and any(
        (c.get("delta") or {}).get("content") or c.get("text") for c in choices if isinstance(c, dict))
    if usage and not client_wants_usage and not choices:
        return None, usage, has_token, False  # the usage chunk we asked for ourselves
    return event + b"\n\n", usage or None, has_token, False


def _may_hold_usage(text: bytes) -> bool:
    """Whether a chunk's JSON has a `"usage":` that is not null (every chunk of a stream that
    asked for usage carries `"usage":null`; inside a JSON string the quotes are escaped)."""
    at = text.find(b'"usage":')
    while at >= 0:
        if not text[at + 8:].lstrip().startswith(b"null"):
            return True
        at = text.find(b'"usage":', at + 8)
    return False


def worker_timeout(model: str) -> DormantError:
    """504 in OpenAI's shape: the worker sent no byte within its read timeout (a hung worker
    that the watchdog has not killed yet, or one wedged inside while its /health answers)."""
    exc = DormantError(f"model {model!r}: the worker sent nothing within its read timeout; the request was "
                       "given up", code="timeout")
    exc.status_code = 504
    return exc


def _worker_failure(model: str, status: int, body: bytes) -> DormantError:
    """The worker's error answer as ours: a client mistake (4xx) keeps its message, type,
    param and code, so the client learns what to fix; anything else says the worker failed."""
    try:
        err = json.loads(body)["error"]
        message = err.get("message") or str(err)
    except (ValueError, KeyError, TypeError, AttributeError):
        err, message = {}, body[:200].decode(errors="replace")
    if 400 <= status < 500 and err:
        exc = DormantError(message, param=err.get("param"), code=err.get("code"))
        exc.error_type = err.get("type") or "invalid_request_error"
    else:
        exc = WorkerError(f"model {model!r}: {message}")
    exc.status_code = status
    return exc
