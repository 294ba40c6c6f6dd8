"""The gateway: `create_app(cfg)` builds the ASGI app, `serve(cfg)` runs it until a signal.

Never imports torch (tests check): the gateway starts in well under a second and talks to
workers over loopback HTTP only. On SIGTERM/SIGINT new requests get 503, those in flight get
`shutdown_grace` seconds and are then ended cleanly (shutdown.py); uvicorn then stops
listening, and the lifespan's exit stops every worker (SIGTERM, then SIGKILL after a grace)
before the process ends. Runtime files left by a gateway that was killed are removed at start.
Clients get bounded time for a request's head and body and for idling between requests
(timeouts.py).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import AsyncIterator

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from dormant.config import ServerConfig
from dormant.errors import DormantError, InvalidRequest
from dormant.gateway.apis.errors import error_response_for
from dormant.gateway.apis.routes import router as apis_router
from dormant.gateway.auth import BearerAuth
from dormant.gateway.body import BodyLimit
from dormant.gateway.metrics import GatewayMetrics
from dormant.disconnect import CLIENT_CLOSED_REQUEST
from dormant.gateway.proxy import Proxy
from dormant.gateway.routes import router
from dormant.gateway.shutdown import GracefulShutdown
from dormant.gateway.timeouts import BodyDeadline, as_seconds, timed_protocol
from dormant.lifecycle.fleet import Fleet
from dormant.store.paths import clean_stale_runtime
from dormant.worker_api import POOL_KEEPALIVE_SECONDS

log = logging.getLogger("dormant.gateway")

# uvicorn's own bound, once GracefulShutdown has ended every request: closing idle connections
UVICORN_SHUTDOWN_SECONDS = 3


def create_app(cfg: ServerConfig) -> FastAPI:
    """The gateway app for `cfg`; workers start on demand once its lifespan runs."""
    client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=64,
                                                   keepalive_expiry=POOL_KEEPALIVE_SECONDS))
    fleet: Fleet | None = None

    def gauge(field: str):
        def collect() -> dict[tuple[str, ...], float]:
            return {(r.spec.id,): float(getattr(r.snapshot(), field)) for r in fleet.replicas()} if fleet else {}
        return collect

    metrics = GatewayMetrics(running=gauge("in_flight"), waiting=gauge("queued"))
    fleet = Fleet(cfg, client, observer=metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for stale in clean_stale_runtime(cfg.store_path()):
            log.info("removed %s, left by a gateway that is gone", stale)
        fleet.start()
        try:
            yield
        finally:
            log.info("stopping workers")
            await fleet.shutdown()
            await client.aclose()

    app = FastAPI(title="dormant", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.cfg, app.state.fleet, app.state.client = cfg, fleet, client
    app.state.metrics, app.state.proxy = metrics, Proxy(metrics)
    app.state.created = int(time.time())
    app.state.max_model_lens = {}  # model id -> the running worker's figure, last seen (apis/models.py)
    app.include_router(router)
    app.include_router(apis_router)
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=cfg.max_request_body_bytes)
    app.add_middleware(BodyDeadline, seconds=cfg.client_body_timeout)
    app.add_middleware(BearerAuth, keys=cfg.api_keys)  # a stranger's body is never read
    if cfg.allowed_origins:
        # outside the key check: a browser's preflight carries no key; every other request
        # still needs one, and its refusal gets the CORS headers the browser needs to read it
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DormantError)
    async def dormant_error(request: Request, exc: DormantError):
        return error_response_for(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return error_response_for(request.url.path, InvalidRequest(str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        err = DormantError(str(exc.detail), code=None)
        err.status_code = exc.status_code
        err.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response_for(request.url.path, err)

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, exc: ClientDisconnect):
        # the client hung up before its body was in: nothing went wrong here, and each such
        # disconnect logged two tracebacks (~9 KB) before (issue 15, item 10)
        log.info("client left before its body was in: %s %s", request.method, request.url.path)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response_for(request.url.path, DormantError(f"internal error: {type(exc).__name__}"))


class _Server(uvicorn.Server):
    """uvicorn, plus the one readiness line on stderr, and the drain before it shuts down."""

    def __init__(self, config: uvicorn.Config, cfg: ServerConfig, drain: GracefulShutdown) -> None:
        super().__init__(config)
        self._cfg = cfg
        self._drain = drain

    async def shutdown(self, sockets=None) -> None:
        await self._drain.run(self._cfg.shutdown_grace)
        await super().shutdown(sockets)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.should_exit:
            return
        port = self._cfg.port
        for server in self.servers:
            for sock in server.sockets:
                port = sock.getsockname()[1]
        names = ", ".join(m.id for m in self._cfg.models)
        print(f"dormant serving on http://{self._cfg.host}:{port} (models: {names})", file=sys.stderr, flush=True)


def serve(cfg: ServerConfig) -> None:
    """Serve `cfg` until SIGTERM/SIGINT; every worker is stopped before this returns."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per proxied request is noise
    drain = GracefulShutdown(create_app(cfg))
    config = uvicorn.Config(
        drain, host=cfg.host, port=cfg.port, loop="asyncio", lifespan="on",
        log_level="warning", access_log=False, timeout_graceful_shutdown=UVICORN_SHUTDOWN_SECONDS,
        # h11 always (not httptools where installed): the client timeouts are built on it
        http=timed_protocol(cfg.client_header_timeout, cfg.client_body_timeout),
        timeout_keep_alive=as_seconds(cfg.client_idle_timeout),
        # clients reach the gateway directly: no X-Forwarded-* to trust, and the middleware
        # that reads them sat on every request's path
        proxy_headers=False,
    )
    _Server(config, cfg, drain).run()
