"""What every engine's loop thread shares: commands sent from asyncio run on the loop thread in
order, a command may ask to wait until no request is in flight (a sleep), and outputs go back
to each request's asyncio queue. The loop itself (when to step, what to do idle) is the
engine's own.

    class MyAsyncEngine(CommandLoop):        # sets self._commands, self._deferred, self._streams
        result = await self._call(fn)        # fn runs on the loop thread; NOT_YET defers it
        self._run_command(fn, fut)           # on the loop thread, for each command taken
        self._run_deferred()                 # once nothing is in flight
        self._deliver(request_id, output)    # to the request's queue, thread-safely
        self._deliver_all([(request_id, output), ...])  # one step's outputs, one wake-up a loop
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
from collections.abc import AsyncIterator
from typing import Any, Callable

NOT_YET = object()  # a command's answer meaning: run me again once no request is in flight


class CommandLoop:
    _commands: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future]]
    _deferred: list[tuple[Callable[[], Any], concurrent.futures.Future]]
    _streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]]

    async def _call(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(self._submit(fn))

    def _submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, fut))
        return fut

    def _run_command(self, fn, fut) -> None:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - delivered to the caller
            settle(fut, exception=e)
            return
        if result is NOT_YET:
            self._deferred.append((fn, fut))
            return
        settle(fut, result=result)

    def _run_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for fn, fut in deferred:
            self._run_command(fn, fut)

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, out = stream
            loop.call_soon_threadsafe(out.put_nowait, item)

    def _deliver_all(self, items: list[tuple[str, Any]]) -> None:
        """Like _deliver for each item, with one call_soon_threadsafe per event loop: each call
        wakes the loop (a write to its self-pipe), and a step of 8 streams woke it 8 times."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                by_loop.setdefault(stream[0], []).append((stream[1], item))
        for loop, puts in by_loop.items():
            loop.call_soon_threadsafe(_put_all, puts)


def _put_all(puts: list[tuple[asyncio.Queue, Any]]) -> None:
    for out, item in puts:
        out.put_nowait(item)


async def outputs_of(out: asyncio.Queue) -> AsyncIterator:
    """A request's outputs from its queue until the finished one; an exception put there is
    raised. A consumer a step or more behind takes what has queued up as one output
    (RequestOutput.then): under load each hop after this one (detokenizing, the SSE chunk,
    the HTTP write) runs once for several tokens, not once a token. 64 streams cost the
    worker's event loop ~136 us a chunk on the 2-core CPU, 64 chunks about a whole decode step
    of an 8B model on the H200, and the engine thread waits on the GIL meanwhile (issue 12)."""
    held = None
    while True:
        item, held = (held, None) if held is not None else (await out.get(), None)
        if isinstance(item, BaseException):
            raise item
        while not item.finished and not out.empty():
            later = out.get_nowait()
            if isinstance(later, BaseException):
                held = later  # raised after what came before it
                break
            item = item.then(later)
        yield item
        if item.finished:
            return


def settle(fut: concurrent.futures.Future, result: Any = None, exception: BaseException | None = None) -> None:
    """Deliver a command's outcome, unless its caller went away: a client that disconnects
    cancels its await, and asyncio.wrap_future passes that on to this future. Setting a
    cancelled future raised in the loop thread and ended the engine loop (issue 15's e2e tests)."""
    try:
        if exception is not None:
            fut.set_exception(exception)
        else:
            fut.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass
