"""Forward one validated OpenAI request to its replica's worker; plain or streamed.

A request first takes a place in its replica (`enter`: 429 here when the queue is full),
then waits to be admitted (held through a start or a wake), then is sent to the worker
through its worker_api.WorkerClient (`worker.client`).
Streams answer at once with SSE comment keep-alives while held, then relay each event as it
arrives; a worker that fails mid-stream ends the stream with an error event and
`data: [DONE]`. Usage is asked from the worker on every stream (for the token counters) and
stripped again when the client did not ask for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

import httpx
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dormant.errors import DormantError, ModelUnavailable, WorkerError
from dormant.gateway.metrics import GatewayMetrics
from dormant.gateway.responses import error_event
from dormant.lifecycle.controller import ReplicaController
from dormant.lifecycle.states import Ticket
from dormant.protocol import FIRST_TOKEN_HEADER, SSE_DONE, SSE_KEEPALIVE

log = logging.getLogger("dormant.gateway")

KEEPALIVE_SECONDS = 2.0


@dataclass
class Forward:
    """What to send where: the worker path (a worker_api.Route), the body towards it, and the
    client's wishes."""

    replica: ReplicaController
    path: str
    payload: dict[str, Any]
    keep_alive: float | None
    stream: bool
    client_wants_usage: bool


def worker_payload(body: dict[str, Any], served_id: str, stream: bool, client_wants_usage: bool) -> dict[str, Any]:
    payload = {k: v for k, v in body.items() if k != "keep_alive"}
    payload["model"] = served_id
    if stream and not client_wants_usage:
        payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
    return payload


class Proxy:
    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    async def forward(self, fwd: Forward) -> Response:
        arrived = time.monotonic()
        ticket = await fwd.replica.enter(fwd.keep_alive)  # QueueFull -> 429 before any byte
        if fwd.stream:
            return StreamingResponse(
                self._stream(fwd, ticket, arrived), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            return await self._plain(fwd, ticket, arrived)
        finally:
            fwd.replica.leave(ticket)

    async def _plain(self, fwd: Forward, ticket: Ticket, arrived: float) -> Response:
        worker = await ticket.admitted  # ModelUnavailable -> 503
        admitted = time.monotonic()
        model = fwd.replica.spec.id
        try:
            r = await worker.client.post(fwd.path, fwd.payload)
        except httpx.HTTPError as exc:
            raise ModelUnavailable(f"model {model!r}: the worker failed while answering ({exc!r})") from None
        done = time.monotonic()
        if r.status_code != 200:
            return Response(r.content, status_code=r.status_code, media_type="application/json")
        try:
            data = r.json()
        except ValueError:
            raise WorkerError(f"model {model!r}: the worker sent a response that is not JSON") from None
        self._metrics.observe_request(model, queue_s=admitted - arrived, ttft_s=plain_ttft(r, admitted - arrived),
                                      e2e_s=done - arrived, usage=data.get("usage"))
        return JSONResponse(data)

    async def _stream(self, fwd: Forward, ticket: Ticket, arrived: float) -> AsyncIterator[bytes]:
        model = fwd.replica.spec.id
        queue_s = ttft_s = None
        usage: dict | None = None
        try:
            if not ticket.admitted.done():
                yield SSE_KEEPALIVE  # headers go out now; the openai SDK ignores comments
                while not ticket.admitted.done():
                    await asyncio.wait({ticket.admitted}, timeout=KEEPALIVE_SECONDS)
                    if not ticket.admitted.done():
                        yield SSE_KEEPALIVE
            try:
                worker = ticket.admitted.result()
            except DormantError as exc:
                yield error_event(exc)
                yield SSE_DONE
                return
            queue_s = time.monotonic() - arrived
            saw_done = False
            async with worker.client.stream(fwd.path, fwd.payload) as r:
                if r.status_code != 200:
                    yield error_event(_worker_failure(model, r.status_code, await r.aread()))
                    yield SSE_DONE
                    return
                buffer = b""
                async for chunk in r.aiter_raw():
                    buffer += chunk
                    while b"\n\n" in buffer:
                        event, buffer = buffer.split(b"\n\n", 1)
                        out, event_usage, has_token, is_done = _relay(event, fwd.client_wants_usage)
                        usage = event_usage or usage
                        if has_token and ttft_s is None:
                            ttft_s = time.monotonic() - arrived
                        if out:
                            yield out
                        if is_done:
                            saw_done = True
                            break
                    if saw_done:
                        break
            if not saw_done:
                raise httpx.RemoteProtocolError("the worker closed the stream before [DONE]")
        except httpx.HTTPError as exc:
            log.warning("model %s: stream failed: %r", model, exc)
            yield error_event(ModelUnavailable(f"model {model!r}: the worker failed mid-stream ({exc})"))
            yield SSE_DONE
        except Exception as exc:  # a bug must end this stream cleanly, not the server
            log.exception("model %s: stream failed", model)
            yield error_event(DormantError(f"internal error: {type(exc).__name__}"))
            yield SSE_DONE
        finally:
            fwd.replica.leave(ticket)
            self._metrics.observe_request(model, queue_s=queue_s, ttft_s=ttft_s,
                                          e2e_s=time.monotonic() - arrived, usage=usage)


def plain_ttft(response: httpx.Response, waited: float) -> float | None:
    """A non-streamed answer's time to first token: the time the request waited here for its
    worker, plus the worker's own (its FIRST_TOKEN_HEADER). None when the header is missing or
    bad: the whole answer's time is no first-token figure."""
    try:
        worker_s = float(response.headers[FIRST_TOKEN_HEADER])
    except (KeyError, ValueError):
        return None
    return waited + worker_s if worker_s >= 0 else None


def _relay(event: bytes, client_wants_usage: bool) -> tuple[bytes | None, dict | None, bool, bool]:
    """One SSE event from the worker -> (bytes for the client or None, usage, has a token, is [DONE])."""
    data = event.strip()
    if not data.startswith(b"data:"):
        return event + b"\n\n", None, False, False  # comments and other fields pass through
    text = data[len(b"data:"):].strip()
    if text == b"[DONE]":
        return SSE_DONE, None, False, True
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


def _worker_failure(model: str, status: int, body: bytes) -> DormantError:
    try:
        err = json.loads(body)["error"]
        message = err.get("message") or str(err)
    except (ValueError, KeyError, TypeError):
        message = body[:200].decode(errors="replace")
    exc = WorkerError(f"model {model!r}: {message}")
    exc.status_code = status
    return exc
