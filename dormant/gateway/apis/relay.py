"""Send a translated request the one way every request goes: proxy.Proxy, so a request of
another API is held through a start or a wake, counted in the metrics and relayed like an
OpenAI one. What comes back is read into the caller's API here:

    complete(...)  -> the worker's JSON body (a worker's refusal raised as a DormantError)
    stream(...)    -> the proxy's streaming response, its events rewritten by a `Translator`

A Translator is a small state machine fed the proxy's events one by one: a chat chunk (dict),
`held()` for a keep-alive while the model starts, `error(exc)` for a failure after the headers
went out, then `finish()`. Translators are pure, so they are tested without processes.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, AsyncIterator, Protocol

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from dormant.errors import DormantError
from dormant.gateway.proxy import Forward, Proxy, worker_payload
from dormant.lifecycle.controller import ReplicaController


class Translator(Protocol):
    media_type: str

    def feed(self, chunk: dict[str, Any]) -> list[bytes]: ...

    def held(self) -> list[bytes]: ...

    def error(self, exc: DormantError) -> list[bytes]: ...

    def finish(self) -> list[bytes]: ...


def _forward(request: Request, replica: ReplicaController, path: str, payload: dict[str, Any],
             keep_alive: float | None, stream: bool) -> Forward:
    if stream:  # the usage chunk, for the translators' final counts
        payload = {**payload, "stream": True, "stream_options": {"include_usage": True}}
    return Forward(replica=replica, path=path, keep_alive=keep_alive, stream=stream, client_wants_usage=stream,
                   payload=worker_payload(payload, replica.spec.id, stream, stream), request=request)


async def complete(request: Request, replica: ReplicaController, path: str, payload: dict[str, Any],
                   keep_alive: float | None) -> dict[str, Any] | Response:
    """The worker's answer as JSON; a Response when there is none to translate (the client left)."""
    proxy: Proxy = request.app.state.proxy
    response = await proxy.forward(_forward(request, replica, path, payload, keep_alive, stream=False))
    if response.status_code != 200 and not response.body:
        return response
    body = json.loads(response.body)
    if response.status_code != 200:
        raise error_from_body(response.status_code, body)
    return body


async def stream(request: Request, replica: ReplicaController, path: str, payload: dict[str, Any],
                 keep_alive: float | None, translator: Translator) -> Response:
    proxy: Proxy = request.app.state.proxy
    response = await proxy.forward(_forward(request, replica, path, payload, keep_alive, stream=True))
    if not isinstance(response, StreamingResponse):
        return response
    response.body_iterator = translated(response.body_iterator, translator)
    response.headers["content-type"] = translator.media_type
    return response


async def translated(events: AsyncIterator[bytes], translator: Translator) -> AsyncIterator[bytes]:
    """The proxy's SSE events (one per item, as proxy._relay_events yields them) through
    `translator`; ends at the proxy's `data: [DONE]`."""
    async with contextlib.aclosing(events):
        async for raw in events:
            for event in raw.split(b"\n\n"):
                event = event.strip()
                if not event:
                    continue
                if event.startswith(b":"):
                    for out in translator.held():
                        yield out
                    continue
                data = event.removeprefix(b"data:").strip()
                if data == b"[DONE]":
                    for out in translator.finish():
                        yield out
                    return
                chunk = json.loads(data)
                if isinstance(chunk, dict) and "error" in chunk:
                    for out in translator.error(error_from_body(None, chunk)):
                        yield out
                    return
                for out in translator.feed(chunk):
                    yield out


def error_from_body(status: int | None, body: Any) -> DormantError:
    """An OpenAI error body (the worker's, or the proxy's error event) as a DormantError,
    its status, type, param and code kept."""
    err = body.get("error") if isinstance(body, dict) else None
    err = err if isinstance(err, dict) else {"message": str(body)}
    exc = DormantError(err.get("message") or "error", param=err.get("param"), code=err.get("code"))
    exc.error_type = err.get("type") or exc.error_type
    exc.status_code = status or _STATUS_OF_TYPE.get(exc.error_type, 500)
    return exc


_STATUS_OF_TYPE = {"invalid_request_error": 400, "authentication_error": 401, "rate_limit_exceeded": 429,
                   "service_unavailable": 503}
