"""The worker contract in front of an engine that is its own OpenAI server (vLLM): dormant's
control routes, and every other route relayed to the server unchanged, over its Unix socket.

    GET  /health       200 once the server's own /health says 200 (its warm-up done)
    POST /sleep        ?level=1|2 relayed; 400 where the server runs without sleep mode (CPU)
    POST /wake_up      relayed (after level 2, the weights are reloaded too)
    GET  /is_sleeping  {"is_sleeping": bool}
    POST /hibernate    {"image": null}: the server writes no engine image
    GET  /stats        worker_api.WorkerStats: this process and the server's processes
    *    anything else relayed as it is: body, query, status, headers, a stream as it comes

Every route but /health wants the worker's secret (server.TokenAuth); the server itself listens
only on a socket in a 0700 folder, so its unauthenticated dev routes are ours alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import httpx
import psutil
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dormant.errors import DormantError, InvalidRequest, ModelUnavailable
from dormant.worker.server import TokenAuth
from dormant.worker_api import WorkerStats

# not relayed: they describe one hop (RFC 9110 7.6.1), or are ours (the secret)
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host",
        "authorization", "content-length", "proxy-authorization", "proxy-connection"}
_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
# idle this long with nothing in flight before the first sleep + wake that pins host memory
PREPIN_IDLE_SECONDS = 2.0


class ExternalState:
    """The server as the routes see it: up or not, asleep or not, and what is in flight."""

    def __init__(self, upstream: httpx.AsyncClient, sleep_mode: bool, started: float) -> None:
        self.upstream = upstream
        self.sleep_mode = sleep_mode
        self.started = started
        self.ready = False
        self.is_sleeping = False
        self.sleep_level = 1
        self.in_flight = 0
        self.last_request = time.monotonic()
        self.server_pid: int | None = None
        self.cold_start: dict = {}
        # cleared while a sleep + wake of our own runs: requests wait for it
        self.awake = asyncio.Event()
        self.awake.set()
        self.control = asyncio.Lock()  # one sleep / wake at a time

    async def call(self, method: str, path: str, **kw) -> httpx.Response:
        r = await self.upstream.request(method, path, timeout=httpx.Timeout(600.0, connect=10.0), **kw)
        if r.status_code >= 300:
            raise ModelUnavailable(f"the engine's server answered {method} {path} with {r.status_code}: "
                                   f"{r.text[:200]}", retry_after=1)
        return r

    async def sleep(self, level: int) -> None:
        async with self.control:
            await self._sleep(level)

    async def wake_up(self) -> None:
        async with self.control:
            await self._wake_up()

    async def _sleep(self, level: int) -> None:
        await self.call("POST", "/sleep", params={"level": str(level)})
        self.is_sleeping, self.sleep_level = True, level

    async def _wake_up(self) -> None:
        if not self.is_sleeping:
            return
        await self.call("POST", "/wake_up")
        if self.sleep_level == 2:  # level 2 dropped the weights: load them again
            await self.call("POST", "/collective_rpc", json={"method": "reload_weights"})
        self.is_sleeping = False

    async def prepin(self) -> None:
        """One sleep and wake once the server is idle: vLLM's first sleep pins its host buffers
        (13 s for 16 GB on the H200, later ones 0.4 s), which no user's request should wait on.
        Idle counts from now (the server's readiness): the request held through the start
        reaches this worker a moment after it, and on the H200 it waited 10-15 s behind a
        prepin that had begun the instant the server was up."""
        self.last_request = max(self.last_request, time.monotonic())
        while self.in_flight or time.monotonic() - self.last_request < PREPIN_IDLE_SECONDS:
            await asyncio.sleep(0.2)
        self.awake.clear()
        try:
            # the sleep and the wake under one hold of the lock: the gateway's idle /sleep, when it
            # came at the same moment (sleep_after 2 s on the GPU machine), either went first and
            # pinned the buffers itself, or waits for both. Taken one at a time, the prepin's wake
            # ran after that /sleep: the replica was "asleep" while vLLM held 35.8 GiB
            async with self.control:
                if self.is_sleeping:
                    return
                started = time.monotonic()
                await self._sleep(1)
                await self._wake_up()
                self.cold_start["prepin_seconds"] = time.monotonic() - started
        finally:
            self.awake.set()


def build_external_app(state: ExternalState, token: str | None) -> FastAPI:
    app = FastAPI(title="dormant worker (external engine)", docs_url=None, redoc_url=None, openapi_url=None)
    if token:
        app.add_middleware(TokenAuth, token=token)

    @app.exception_handler(DormantError)
    async def _dormant_error(_request: Request, exc: DormantError) -> JSONResponse:
        return JSONResponse(exc.to_openai_body(), status_code=exc.status_code, headers=exc.headers())

    def require_ready() -> None:
        if not state.ready:
            raise ModelUnavailable("The engine's server is still starting.", retry_after=1)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if state.ready else 503)

    @app.post("/sleep")
    async def sleep(level: int = 1) -> Response:
        require_ready()
        if not state.sleep_mode:
            raise InvalidRequest("level must be none: this engine runs without sleep mode", param="level")
        if level not in (1, 2):
            raise InvalidRequest("level must be 1 or 2", param="level")
        await state.awake.wait()
        await state.sleep(level)
        return Response(status_code=200)

    @app.post("/wake_up")
    async def wake_up() -> Response:
        require_ready()
        await state.wake_up()
        return Response(status_code=200)

    @app.get("/is_sleeping")
    async def is_sleeping() -> dict:
        return {"is_sleeping": state.is_sleeping}

    @app.post("/hibernate")
    async def hibernate() -> dict:
        return {"image": None}

    @app.get("/stats")
    async def stats() -> dict:
        me = psutil.Process()
        rss = me.memory_info().rss
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                rss += child.memory_info().rss
        return WorkerStats(pid=os.getpid(), rss_bytes=rss, loading=not state.ready, is_sleeping=state.is_sleeping,
                           num_running=state.in_flight, weights_source="vllm",
                           cold_start={"phases": {}, "path": "cold", **state.cold_start}).to_dict()

    @app.api_route("/{path:path}", methods=_METHODS)
    async def relay(path: str, request: Request) -> Response:
        require_ready()
        await state.awake.wait()
        if state.is_sleeping:  # as a native worker does: a request that finds it asleep wakes it
            await state.wake_up()
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
        upstream = state.upstream.build_request(request.method, "/" + path, params=request.query_params,
                                                headers=headers, content=await request.body(), timeout=None)
        state.in_flight += 1
        state.last_request = time.monotonic()
        try:
            response = await state.upstream.send(upstream, stream=True)
        except httpx.HTTPError as e:
            state.in_flight -= 1
            raise ModelUnavailable(f"the engine's server did not answer: {e}", retry_after=1) from None

        async def body():
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            finally:  # the client gone, or the server's stream cut: the server's request ends too
                await response.aclose()
                state.in_flight -= 1
                state.last_request = time.monotonic()

        out = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in _HOP]
        return StreamingResponse(body(), status_code=response.status_code, headers=dict(out))

    return app
