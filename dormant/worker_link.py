"""The gateway's requests to one worker, over plain HTTP/1.1 on kept-alive loopback connections.

    link = WorkerLink("127.0.0.1", port, read_timeout=600.0, keepalive=2.0)
    response = await link.send("/v1/completions", body_bytes, headers, stream=False)
    response.status_code, response.headers, response.content, response.json()
    async for chunk in response.aiter_raw(): ...      # stream=True: the body as it comes
    await response.aclose()                            # a whole body read: the connection is kept

Why not httpx for these: through httpx a 1-token request cost the gateway 1.8 ms of CPU on
the 2-core machine (connection pool, anyio streams, header models), this 0.28 ms; the gateway's
overhead goal is 2 ms in all (issue 14). The control calls (health, sleep, stats) stay on httpx.

Only what a worker sends is read: a Content-Length body or a chunked one (uvicorn's streams).
Failures are raised as httpx's exception classes, so callers keep one vocabulary:

    httpx.ConnectError        nothing listens (the worker exited): nothing was sent
    httpx.ConnectTimeout      the connect took over CONNECT_TIMEOUT_SECONDS
    httpx.ReadTimeout         no byte for `read_timeout` seconds
    httpx.WriteTimeout        the request could not be written in WRITE_TIMEOUT_SECONDS
    httpx.RemoteProtocolError the worker closed the connection, or sent what is not HTTP/1.1

A connection closed before any byte of an answer (a kept one the worker closed while idle; a
new one accepted by a worker in the instant it was killed) is tried once more on a new
connection: a worker that is gone refuses that one (ConnectError), and the gateway holds the
request for the restart. The e2e load test lost a request it could have held when only kept
connections were tried again.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from typing import Any, AsyncIterator

import httpx

CONNECT_TIMEOUT_SECONDS = 10.0
WRITE_TIMEOUT_SECONDS = 60.0
MAX_IDLE_CONNECTIONS = 64


class _Unanswered(Exception):
    """The worker closed the connection before any byte of an answer."""


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.idle_since = 0.0

    def is_usable(self, now: float, keepalive: float) -> bool:
        return (now - self.idle_since < keepalive and not self.reader.at_eof()
                and not self.writer.is_closing())

    def close(self) -> None:
        self.writer.close()


class WorkerLink:
    """One worker's address and its idle connections (dropped after `keepalive` seconds, before
    the worker's uvicorn drops them at 5 s: at equal timeouts a request could go out on a
    socket the worker is closing)."""

    def __init__(self, host: str, port: int, read_timeout: float | None, keepalive: float) -> None:
        self.host, self.port = host, port
        self.read_timeout = read_timeout
        self.keepalive = keepalive
        self._idle: deque[_Connection] = deque()

    async def send(self, path: str, body: bytes, headers: dict[str, str], stream: bool) -> "WorkerResponse":
        request = self._head(path, body, headers) + body
        try:
            return await self._exchange(await self._connection(), request, stream)
        except _Unanswered:
            pass  # once more, on a new connection
        try:
            return await self._exchange(await self._connect(), request, stream)
        except _Unanswered as e:
            raise httpx.RemoteProtocolError(f"the worker closed the connection before answering ({e.__cause__!r})") from None

    def close_idle(self) -> None:
        while self._idle:
            self._idle.pop().close()

    def _head(self, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        lines = [f"POST {path} HTTP/1.1", f"host: {self.host}:{self.port}", "content-type: application/json",
                 f"content-length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _connection(self) -> _Connection:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # the most recently used: the likeliest to be open
            if conn.is_usable(now, self.keepalive):
                return conn
            conn.close()
        return await self._connect()

    async def _connect(self) -> _Connection:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port),
                                                    CONNECT_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {self.host}:{self.port} took over "
                                       f"{CONNECT_TIMEOUT_SECONDS:.0f} s") from None
        except OSError as e:
            raise httpx.ConnectError(f"connecting to {self.host}:{self.port}: {e}") from None
        return _Connection(reader, writer)

    async def _exchange(self, conn: _Connection, request: bytes, stream: bool) -> "WorkerResponse":
        """Write `request`, read the answer's head (and its body unless `stream`). A connection
        closed before any byte of the answer is _Unanswered."""
        response = WorkerResponse(conn, self)
        try:
            try:
                conn.writer.write(request)
                async with asyncio.timeout(WRITE_TIMEOUT_SECONDS):
                    await conn.writer.drain()
                await response.read_head()
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                if not getattr(e, "partial", b""):
                    raise _Unanswered() from e
                raise httpx.RemoteProtocolError(f"the worker closed the connection ({e!r})") from None
            except asyncio.TimeoutError:
                raise httpx.WriteTimeout(f"the request could not be written in {WRITE_TIMEOUT_SECONDS:.0f} s") from None
            if not stream:
                await response.aread()
                await response.aclose()
            return response
        except BaseException:
            conn.close()
            raise

    def _put_back(self, conn: _Connection) -> None:
        now = time.monotonic()
        while self._idle and not self._idle[0].is_usable(now, self.keepalive):  # the oldest first
            self._idle.popleft().close()
        if len(self._idle) >= MAX_IDLE_CONNECTIONS:
            conn.close()
            return
        conn.idle_since = now
        self._idle.append(conn)

    async def _read(self, awaitable):
        """One read from the worker, bounded by the read timeout; the worker's close is a
        RemoteProtocolError."""
        try:
            async with asyncio.timeout(self.read_timeout):  # no task per read, as wait_for makes
                return await awaitable
        except asyncio.TimeoutError:
            raise httpx.ReadTimeout(f"the worker sent nothing for {self.read_timeout:.0f} s") from None
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            raise httpx.RemoteProtocolError(f"the worker closed the connection ({e!r})") from None
        except asyncio.LimitOverrunError:  # a line past the reader's 64 KiB
            raise httpx.RemoteProtocolError("the worker sent a line too long for HTTP/1.1 framing") from None


class WorkerResponse:
    """A worker's answer: its status and headers are read; its body is read by `aread` (done
    already when not streamed) or as it comes by `aiter_raw`. `aclose` keeps the connection
    for the next request when the whole body was read, and closes it otherwise (the worker
    then aborts what it was generating)."""

    def __init__(self, conn: _Connection, link: WorkerLink) -> None:
        self._conn, self._link = conn, link
        self.status_code = 0
        self.headers = httpx.Headers()
        self.content = b""
        self._length: int | None = None
        self._chunked = False
        self._keep_alive = False
        self._done = False

    async def read_head(self) -> None:
        """The status line and headers. The worker's close before them is raised as
        asyncio.IncompleteReadError or ConnectionError (WorkerLink tells a stale connection)."""
        try:
            async with asyncio.timeout(self._link.read_timeout):
                raw = await self._conn.reader.readuntil(b"\r\n\r\n")
        except asyncio.TimeoutError:
            raise httpx.ReadTimeout(f"the worker sent nothing for {self._link.read_timeout:.0f} s") from None
        except asyncio.LimitOverrunError:  # the reader's 64 KiB; a worker's head is a few hundred bytes
            raise httpx.RemoteProtocolError("the worker's response head is too long") from None
        status_line, *lines = raw.decode("latin-1").split("\r\n")
        try:
            version, code, *_ = status_line.split(" ", 2)
            self.status_code = int(code)
        except ValueError:
            raise httpx.RemoteProtocolError(f"not an HTTP status line: {status_line[:80]!r}") from None
        self.headers = httpx.Headers([tuple(part.strip() for part in line.split(":", 1))
                                      for line in lines if ":" in line])
        connection = self.headers.get("connection", "").lower()
        self._keep_alive = version == "HTTP/1.1" and connection != "close"
        self._chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        if not self._chunked and "content-length" in self.headers:
            self._length = int(self.headers["content-length"])

    async def aread(self) -> bytes:
        if not self._done:
            self.content = b"".join([chunk async for chunk in self.aiter_raw()])
        return self.content

    def json(self) -> Any:
        return json.loads(self.content)

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        reader, read = self._conn.reader, self._link._read
        if self._chunked:
            while True:
                size_line = await read(reader.readuntil(b"\r\n"))
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise httpx.RemoteProtocolError(f"bad chunk size {size_line[:40]!r}") from None
                if size == 0:
                    await read(reader.readuntil(b"\r\n"))  # no trailers from uvicorn: the blank line
                    break
                chunk = await read(reader.readexactly(size + 2))
                yield chunk[:-2]
        elif self._length is not None:
            left = self._length
            while left:
                chunk = await read(reader.read(min(left, 1 << 16)))
                if not chunk:
                    raise httpx.RemoteProtocolError("the worker closed the connection mid-body")
                left -= len(chunk)
                yield chunk
        else:  # a body up to the close
            self._keep_alive = False
            while chunk := await read(reader.read(1 << 16)):
                yield chunk
        self._done = True

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._done and self._keep_alive:
            self._link._put_back(conn)
        else:
            conn.close()
