"""The worker's HTTP server: the OpenAI routes plus `vllm serve` dev-mode control routes.

    GET  /health                200 once the model is loaded and warmed up; 503 before (the server
                                starts first and answers while the model loads beside it)
    GET  /v1/models
    POST /v1/chat/completions   plain and `stream: true` (SSE, ends with `data: [DONE]`)
    POST /v1/completions
    POST /sleep?level=1|2       waits for in-flight requests, then frees weights and KV cache;
                                400 for a level the engine has not (its capabilities)
    POST /wake_up
    GET  /is_sleeping           {"is_sleeping": bool}
    POST /hibernate             writes the engine image if not yet on disk (the gateway then stops
                                us); {"image": folder}, or {"image": null} for an engine without images
    POST /tokenize, /detokenize vLLM's shapes (worker/tokenize.py), off the event loop
    GET  /stats                 worker_api.WorkerStats: the engine's figures and the process's,
                                cold_start: {phases, weights_source, path} (worker/profile.py)

Every route but /health wants the worker's secret (worker_api.TOKEN_ENV) as `Authorization:
Bearer`; without it, 401 in OpenAI's shape, before the body is read. /health stays open: an
empty 200 or 503 tells a stranger only that a worker is here, which the open port already does.

The paths are worker_api.Route's. A request that arrives while asleep wakes the engine first.
The engine is any engines.base.Engine; nothing here knows which. What a completion route does
between the OpenAI request and the engine (prompt ids, sampling, streaming) is worker/serving.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import os
import time

import psutil
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from dormant.engines.base import Engine
from dormant.errors import AuthenticationFailed, DormantError, InvalidRequest, ModelUnavailable
from dormant.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, parse_request
from dormant.worker.chat_template import ModelFormats
from dormant.worker.profile import StartupProfile
from dormant.worker.serving import _TOKENIZING, generate, prompt_ids
from dormant.worker.tokenize import detokenize, tokenize
from dormant.worker_api import Route, WorkerStats

log = logging.getLogger("dormant.worker")


class WorkerState:
    """What the routes serve. Built empty (`engine=None`) when the server starts before the
    model has loaded: every route but /health, /v1/models and /stats answers 503 until
    `attach` (the gateway sends nothing before /health says 200)."""

    def __init__(self, engine: Engine | None, tokenizer, model_names: list[str], max_model_len: int | None,
                 startup: StartupProfile | None = None, sampling_defaults: dict[str, float] | None = None,
                 parsers: tuple[str | None, str | None] = (None, None)):
        self.model_names = model_names
        self.parsers = parsers  # (tool_call_parser, reasoning_parser) as configured
        self.created = int(time.time())
        self.startup = startup or StartupProfile(time.time())
        self.server_up = False  # set by the server's lifespan startup
        self.engine: Engine | None = None
        self.attach(engine, tokenizer, max_model_len, sampling_defaults)

    def attach(self, engine: Engine | None, tokenizer, max_model_len: int | None,
               sampling_defaults: dict[str, float] | None = None) -> None:
        # what a request leaves out, as vLLM does: the model's generation_config.json
        self.sampling_defaults = {"temperature": 1.0, "top_p": 1.0, **(sampling_defaults or {})}
        self.tokenizer = tokenizer
        self.formats = ModelFormats.of(tokenizer, *self.parsers) if tokenizer is not None else None
        self.max_model_len = max_model_len
        self.engine = engine

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def require_ready(self) -> None:
        """Routes that need the engine call this first (a plain check, no middleware: that
        would sit in front of every streamed token)."""
        if self.engine is None:
            raise ModelUnavailable("The model is still loading in this worker.", retry_after=1)

    def note_first_token(self, arrived: float) -> None:
        if "first_token" not in self.startup.phases:
            self.startup.phases["first_token"] = time.time() - arrived


def build_app(state: WorkerState, token: str | None = None) -> FastAPI:
    """The worker's app; with `token`, every route but /health refuses a request without it."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        state.server_up = True
        yield

    app = FastAPI(title="dormant worker", lifespan=lifespan)
    if token:
        app.add_middleware(TokenAuth, token=token)  # outermost: a stranger's body is never read

    @app.exception_handler(DormantError)
    async def _dormant_error(_request: Request, exc: DormantError) -> JSONResponse:
        return JSONResponse(exc.to_openai_body(), status_code=exc.status_code, headers=exc.headers())

    @app.get(Route.HEALTH)
    async def health() -> Response:
        return Response(status_code=200 if state.ready else 503)

    @app.get(Route.MODELS)
    async def models() -> dict:
        cards = [ModelCard(id=name, created=state.created) for name in state.model_names]
        return ModelList(data=cards).model_dump()

    @app.post(Route.CHAT_COMPLETIONS)
    async def chat_completions(request: Request):
        state.require_ready()
        req = parse_request(ChatCompletionRequest, await _json(request))
        return await generate(state, req, await prompt_ids(state, req), chat=True, request=request)

    @app.post(Route.COMPLETIONS)
    async def completions(request: Request):
        state.require_ready()
        req = parse_request(CompletionRequest, await _json(request))
        return await generate(state, req, await prompt_ids(state, req), chat=False, request=request)

    @app.post(Route.TOKENIZE)
    async def tokenize_route(request: Request) -> dict:
        state.require_ready()
        body = await _json(request)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_TOKENIZING, tokenize, state.tokenizer, state.max_model_len, body)

    @app.post(Route.DETOKENIZE)
    async def detokenize_route(request: Request) -> dict:
        state.require_ready()
        body = await _json(request)
        return await asyncio.get_running_loop().run_in_executor(_TOKENIZING, detokenize, state.tokenizer, body)

    @app.post(Route.SLEEP)
    async def sleep(level: int = 1) -> Response:
        state.require_ready()
        levels = state.engine.capabilities.sleep_levels
        if level not in levels:
            have = " or ".join(map(str, levels)) if levels else "none: this engine cannot sleep"
            raise InvalidRequest(f"level must be {have}", param="level")
        await state.engine.sleep(level)
        return Response(status_code=200)

    @app.post(Route.WAKE_UP)
    async def wake_up() -> Response:
        state.require_ready()
        await state.engine.wake_up()
        return Response(status_code=200)

    @app.get(Route.IS_SLEEPING)
    async def is_sleeping() -> dict:
        state.require_ready()
        return {"is_sleeping": state.engine.is_sleeping}

    @app.post(Route.HIBERNATE)
    async def hibernate() -> dict:
        """Make sure the engine image is written; the gateway then stops this process."""
        state.require_ready()
        if not state.engine.capabilities.engine_image:
            return {"image": None}
        return {"image": await state.engine.save_image()}

    @app.get(Route.STATS)
    async def stats() -> dict:
        process = {"pid": os.getpid(), "rss_bytes": psutil.Process().memory_info().rss,
                   "cold_start": state.startup.as_dict()}
        if not state.ready:
            return WorkerStats(**process, loading=True).to_dict()
        return WorkerStats(**process, max_model_len=state.max_model_len,
                           **dataclasses.asdict(state.engine.stats())).to_dict()

    return app


class TokenAuth:
    """A pure ASGI middleware (streams pass untouched, and so does a client's disconnect, which
    aborts its generation) that lets through only requests carrying the worker's secret."""

    OPEN_PATHS = frozenset({Route.HEALTH})

    def __init__(self, app, token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN_PATHS:
            return await self.app(scope, receive, send)
        sent = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(sent, self._expected):
            return await self.app(scope, receive, send)
        exc = AuthenticationFailed("This worker answers only the dormant gateway that started it.")
        response = JSONResponse(exc.to_openai_body(), status_code=exc.status_code, headers=exc.headers())
        await response(scope, receive, send)


async def _json(request: Request):
    try:
        return await request.json()
    except ValueError:
        raise InvalidRequest("The request body is not valid JSON.") from None
