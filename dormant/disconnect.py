"""A request's work raced against its client leaving, for the gateway and the worker alike:
a client that disconnects cancels the work (the gateway's call to its worker, the worker's
generation), so nothing keeps generating for nobody (issue 15, item 2)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Awaitable, TypeVar

from fastapi import Request

# nginx's status for "the client closed the request": nobody reads it, the logs do
CLIENT_CLOSED_REQUEST = 499
T = TypeVar("T")


async def unless_client_leaves(request: Request | None, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None once the client has disconnected; `work` is then cancelled
    (and awaited, so what its cancellation sends, such as an abort, has gone out)."""
    if request is None:
        return await work
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_client_left(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def _client_left(request: Request) -> None:
    """Returns once the client is gone. The body has been read: uvicorn's `receive` then
    answers `http.disconnect` when the connection drops (after, at most, one empty body)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
