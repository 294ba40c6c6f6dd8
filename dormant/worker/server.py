"""The worker's HTTP server: the OpenAI routes plus `vllm serve` dev-mode control routes.

    GET  /health                200 once the model is loaded and warmed up; 503 before (the server
                                starts first and answers while the model loads beside it)
    GET  /v1/models
    POST /v1/chat/completions   plain and `stream: true` (SSE, ends with `data: [DONE]`)
    POST /v1/completions
    POST /sleep?level=1|2       waits for in-flight requests, then frees weights and KV cache
    POST /wake_up
    GET  /is_sleeping           {"is_sleeping": bool}
    POST /hibernate             writes the engine image if not yet on disk (the gateway then stops us)
    GET  /stats                 {pid, rss_bytes, weights_bytes, kv_cache_bytes, is_sleeping, ...,
                                 cold_start: {phases, weights_source, path}} (worker/profile.py)

A request that arrives while asleep wakes the engine first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict

import psutil
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dormant.engines.base import SamplingParams
from dormant.engines.native.core.async_engine import AsyncLLMEngine
from dormant.errors import DormantError, InvalidRequest, ModelUnavailable
from dormant.protocol import (
    FIRST_TOKEN_HEADER,
    SSE_DONE,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChunkChoice,
    ChunkDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    ResponseMessage,
    Usage,
    parse_request,
    sse_event,
)
from dormant.worker.detokenizer import IncrementalDetokenizer
from dormant.worker.profile import StartupProfile

log = logging.getLogger("dormant.worker")


class WorkerState:
    """What the routes serve. Built empty (`engine=None`) when the server starts before the
    model has loaded: every route but /health, /v1/models and /stats answers 503 until
    `attach` (the gateway sends nothing before /health says 200)."""

    def __init__(self, engine: AsyncLLMEngine | None, tokenizer, model_names: list[str], max_model_len: int | None,
                 startup: StartupProfile | None = None, sampling_defaults: dict[str, float] | None = None):
        self.model_names = model_names
        self.created = int(time.time())
        self.startup = startup or StartupProfile(time.time())
        self.server_up = False  # set by the server's lifespan startup
        self.engine: AsyncLLMEngine | None = None
        self.attach(engine, tokenizer, max_model_len, sampling_defaults)

    def attach(self, engine: AsyncLLMEngine | None, tokenizer, max_model_len: int | None,
               sampling_defaults: dict[str, float] | None = None) -> None:
        # what a request leaves out, as vLLM does: the model's generation_config.json
        self.sampling_defaults = {"temperature": 1.0, "top_p": 1.0, **(sampling_defaults or {})}
        self.tokenizer = tokenizer
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


def build_app(state: WorkerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        state.server_up = True
        yield

    app = FastAPI(title="dormant worker", lifespan=lifespan)

    @app.exception_handler(DormantError)
    async def _dormant_error(_request: Request, exc: DormantError) -> JSONResponse:
        return JSONResponse(exc.to_openai_body(), status_code=exc.status_code, headers=exc.headers())

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if state.ready else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        cards = [ModelCard(id=name, created=state.created) for name in state.model_names]
        return ModelList(data=cards).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        state.require_ready()
        req = parse_request(ChatCompletionRequest, await _json(request))
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in req.messages]
        try:
            prompt_ids = state.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # the model's own Jinja template refused these messages
            raise InvalidRequest(f"The model's chat template rejected the messages: {exc}", param="messages") from None
        if not isinstance(prompt_ids, list):
            prompt_ids = prompt_ids["input_ids"]
        return await _generate(state, req, list(prompt_ids), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        state.require_ready()
        req = parse_request(CompletionRequest, await _json(request))
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            prompt_ids = list(prompt)
            vocab = len(state.tokenizer)
            if any(not 0 <= t < vocab for t in prompt_ids):
                raise InvalidRequest(f"Token ids in 'prompt' must be in [0, {vocab}).", param="prompt")
        else:
            text = prompt[0] if isinstance(prompt, list) else prompt
            prompt_ids = state.tokenizer.encode(text)
        return await _generate(state, req, prompt_ids, chat=False)

    @app.post("/sleep")
    async def sleep(level: int = 1) -> Response:
        state.require_ready()
        if level not in (1, 2):
            raise InvalidRequest("level must be 1 or 2", param="level")
        await state.engine.sleep(level)
        return Response(status_code=200)

    @app.post("/wake_up")
    async def wake_up() -> Response:
        state.require_ready()
        await state.engine.wake_up()
        return Response(status_code=200)

    @app.get("/is_sleeping")
    async def is_sleeping() -> dict:
        state.require_ready()
        return {"is_sleeping": state.engine.is_sleeping}

    @app.post("/hibernate")
    async def hibernate() -> dict:
        """Make sure the engine image is written; the gateway then stops this process."""
        state.require_ready()
        return {"image": await state.engine.save_image()}

    @app.get("/stats")
    async def stats() -> dict:
        engine = asdict(state.engine.stats()) if state.ready else {"loading": True}
        return {"pid": os.getpid(), "rss_bytes": psutil.Process().memory_info().rss, **engine,
                "cold_start": state.startup.as_dict()}

    return app


async def _json(request: Request):
    try:
        return await request.json()
    except ValueError:
        raise InvalidRequest("The request body is not valid JSON.") from None


def sampling_defaults(model_dir) -> dict[str, float]:
    """temperature / top_p from the model's generation_config.json, where it samples."""
    import json
    from pathlib import Path

    path = Path(model_dir) / "generation_config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if cfg.get("do_sample") is False:
        return {}
    return {k: float(cfg[k]) for k in ("temperature", "top_p") if isinstance(cfg.get(k), (int, float))}


def _sampling_params(req, num_prompt_tokens: int, max_model_len: int, defaults: dict[str, float]) -> SamplingParams:
    if num_prompt_tokens >= max_model_len:
        raise InvalidRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
            f"{num_prompt_tokens} tokens. Please reduce the length of the prompt.",
            param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )
    return SamplingParams(
        temperature=defaults["temperature"] if req.temperature is None else req.temperature,
        top_p=defaults["top_p"] if req.top_p is None else req.top_p,
        seed=req.seed,
        max_tokens=req.max_output_tokens,
        ignore_eos=bool(req.ignore_eos),
    )


async def _generate(state: WorkerState, req, prompt_ids: list[int], chat: bool):
    params = _sampling_params(req, len(prompt_ids), state.max_model_len, state.sampling_defaults)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    model = req.model
    created = int(time.time())
    if req.stream:
        body = _stream(state, request_id, model, created, prompt_ids, params, stop, chat, req.include_usage)
        return StreamingResponse(body, media_type="text/event-stream")
    pieces, reason, num_completion = [], None, 0
    timing: dict[str, float] = {}
    async for delta, finish_reason, n in _run(state, request_id, prompt_ids, params, stop, timing):
        pieces.append(delta)
        reason, num_completion = finish_reason or reason, n
    usage = Usage(prompt_tokens=len(prompt_ids), completion_tokens=num_completion, total_tokens=len(prompt_ids) + num_completion)
    text = "".join(pieces)
    if chat:
        choice = ChatChoice(message=ResponseMessage(content=text), finish_reason=reason)
        body = ChatCompletionResponse(id=request_id, created=created, model=model, choices=[choice], usage=usage)
    else:
        body = CompletionResponse(id=request_id, created=created, model=model,
                                  choices=[CompletionChoice(text=text, finish_reason=reason)], usage=usage)
    # the gateway's time-to-first-token metric: a whole answer shows only its end
    headers = {FIRST_TOKEN_HEADER: f"{timing['first_token_s']:.6f}"} if "first_token_s" in timing else None
    return JSONResponse(body.model_dump(), headers=headers)


async def _run(state, request_id, prompt_ids, params, stop,
               timing: dict[str, float] | None = None) -> AsyncIterator[tuple[str, str | None, int]]:
    """Yield (text delta, finish_reason or None, completion tokens so far); the last item has a
    reason. `timing` gets "first_token_s": seconds from here to the first token."""
    detok = IncrementalDetokenizer(state.tokenizer, stop)
    num_completion = 0
    arrived = time.time()
    stream = state.engine.generate(request_id, prompt_ids, params)
    async with contextlib.aclosing(stream):
        async for new_ids, finished, reason in stream:
            if not num_completion:
                state.note_first_token(arrived)
                if timing is not None:
                    timing["first_token_s"] = time.time() - arrived
            num_completion += len(new_ids)
            delta = detok.add(new_ids)
            if detok.stopped:
                yield delta, "stop", num_completion
                return  # closing the stream aborts the request in the engine
            if finished:
                yield delta + detok.flush(), reason, num_completion
                return
            if delta:
                yield delta, None, num_completion


async def _stream(state, request_id, model, created, prompt_ids, params, stop, chat, include_usage):
    num_completion = 0
    if chat:
        def chunk(delta: ChunkDelta, reason=None):
            return ChatCompletionChunk(
                id=request_id, created=created, model=model,
                choices=[ChunkChoice(delta=delta, finish_reason=reason)],
            )
        yield sse_event(_usage_null(chunk(ChunkDelta(role="assistant", content="")), include_usage))
    else:
        def chunk(delta: ChunkDelta, reason=None):
            return CompletionResponse(
                id=request_id, created=created, model=model,
                choices=[CompletionChoice(text=delta.content or "", finish_reason=reason)],
            )
    async for delta, reason, n in _run(state, request_id, prompt_ids, params, stop):
        num_completion = n
        if delta:
            yield sse_event(_usage_null(chunk(ChunkDelta(content=delta)), include_usage))
        if reason is not None:
            yield sse_event(_usage_null(chunk(ChunkDelta(), reason), include_usage))
    if include_usage:
        usage = Usage(prompt_tokens=len(prompt_ids), completion_tokens=num_completion, total_tokens=len(prompt_ids) + num_completion)
        final = chunk(ChunkDelta())
        final.choices = []
        final.usage = usage
        yield sse_event(final)
    yield SSE_DONE


def _usage_null(model, include_usage: bool):
    """With include_usage, ordinary chunks carry `usage: null`; without, the field is left out."""
    data = model.model_dump()
    if not include_usage:
        data.pop("usage", None)
    return data
