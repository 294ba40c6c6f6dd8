"""worker_link.WorkerLink against real loopback servers that answer as a worker's uvicorn does
(Content-Length and chunked bodies, kept-alive connections) and fail as a worker can: a kept
connection closed while idle, a connection dropped unanswered, nothing listening, no answer."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from dormant.worker_link import WorkerLink


def _answer(body: bytes, extra: str = "") -> bytes:
    return (f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
            .encode() + body)


def _chunked(pieces: list[bytes]) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    return head + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


class Server:
    """A loopback server whose `handle(n, request_bytes)` gives the bytes to send for the n-th
    request (None: close the connection unanswered; ... : never answer)."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed_by_peer = asyncio.Event()

    async def __aenter__(self) -> WorkerLink:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return WorkerLink("127.0.0.1", port, read_timeout=5.0, keepalive=2.0)

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                out = self.handle(len(self.requests), request)
                if out is None:
                    break
                if out is ...:
                    await reader.read()  # until the client gives up
                    break
                writer.write(out)
                await writer.drain()
        except asyncio.IncompleteReadError:
            self.closed_by_peer.set()
        finally:
            writer.close()


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


@pytest.mark.timeout(30)
def test_a_kept_alive_connection_carries_the_next_request():
    async def go():
        server = Server(lambda n, req: _answer(json.dumps({"n": n}).encode(), "X-Dormant-First-Token-Seconds: 0.5\r\n"))
        async with server as link:
            for n in (1, 2, 3):
                r = await link.send("/v1/completions", b'{"prompt":"hi"}', {"authorization": "Bearer s"}, stream=False)
                assert (r.status_code, r.json()) == (200, {"n": n})
                assert r.headers["x-dormant-first-token-seconds"] == "0.5"  # any case, as httpx's
        assert server.connections == 1
        first = server.requests[0]
        assert first.startswith(b"POST /v1/completions HTTP/1.1\r\n")
        assert b"authorization: Bearer s\r\n" in first and first.endswith(b'\r\n\r\n{"prompt":"hi"}')

    _run(go())


@pytest.mark.timeout(30)
def test_a_chunked_stream_comes_in_order_and_its_connection_is_kept():
    pieces = [b"data: {\"a\": 1}\n\n", b"data: {\"b\": 2}\n\n", b"data: [DONE]\n\n"]

    async def go():
        server = Server(lambda n, req: _chunked(pieces))
        async with server as link:
            for _ in range(2):
                r = await link.send("/v1/completions", b"{}", {}, stream=True)
                assert b"".join([c async for c in r.aiter_raw()]) == b"".join(pieces)
                await r.aclose()
        assert server.connections == 1

    _run(go())


@pytest.mark.timeout(30)
def test_a_stream_left_before_its_end_closes_its_connection():
    """The worker sees the close and aborts the generation (issue 15, item 2)."""
    endless = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n"

    async def go():
        server = Server(lambda n, req: endless if n == 1 else _answer(b"{}"))
        async with server as link:
            r = await link.send("/v1/completions", b"{}", {}, stream=True)
            async for chunk in r.aiter_raw():
                assert chunk == b"hello"
                break
            await r.aclose()
            await asyncio.wait_for(server.closed_by_peer.wait(), 10)
            assert (await link.send("/v1/completions", b"{}", {}, stream=False)).status_code == 200
        assert server.connections == 2

    _run(go())


@pytest.mark.timeout(30)
def test_a_request_the_worker_closed_unanswered_is_sent_once_more_on_a_new_connection():
    async def go():
        # a new connection the worker accepts and closes unanswered (killed at that instant):
        # the second try reaches the worker that answers (the gateway holds it for a restart
        # when nothing listens any more: ConnectError)
        server = Server(lambda n, req: None if n == 1 else _answer(b'{"ok": true}'))
        async with server as link:
            r = await link.send("/v1/completions", b"{}", {}, stream=True)
            assert (r.status_code, await r.aread()) == (200, b'{"ok": true}')
            await r.aclose()
        assert (server.connections, len(server.requests)) == (2, 2)

    _run(go())


@pytest.mark.timeout(30)
def test_a_kept_connection_the_worker_closed_is_resent_once_on_a_new_one():
    async def go():
        # the second request arrives on the kept connection as the worker closes it (its idle
        # timeout): unanswered, it goes once more on a new connection
        server = Server(lambda n, req: None if n == 2 else _answer(b'{"ok": true}'))
        async with server as link:
            for _ in range(2):
                assert (await link.send("/v1/completions", b"{}", {}, stream=False)).json() == {"ok": True}
        assert (server.connections, len(server.requests)) == (2, 3)

    _run(go())


@pytest.mark.timeout(30)
def test_a_worker_that_fails_is_an_httpx_error():
    async def go():
        dropping = Server(lambda n, req: None)  # every connection closed unanswered: tried twice
        async with dropping as link:
            with pytest.raises(httpx.RemoteProtocolError):
                await link.send("/v1/completions", b"{}", {}, stream=False)
        assert (dropping.connections, len(dropping.requests)) == (2, 2)
        async with Server(lambda n, req: ...) as link:  # no byte back
            link.read_timeout = 0.2
            with pytest.raises(httpx.ReadTimeout):
                await link.send("/v1/completions", b"{}", {}, stream=False)
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        with pytest.raises(httpx.ConnectError):  # nothing listens: nothing was sent
            await WorkerLink("127.0.0.1", port, read_timeout=5.0, keepalive=2.0).send("/x", b"{}", {}, stream=False)

    _run(go())
