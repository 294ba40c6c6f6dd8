"""The routes of the other APIs on the gateway's port. Thin, as gateway/routes.py: parse,
translate (the API's module), resolve the model, send through relay (the proxy), translate
back. A refusal raised here is shaped by its path (apis/errors.py) in the app's handlers.

    POST /v1/responses            openai_responses.py
    POST /v1/messages             anthropic.py
    POST /api/chat, /api/generate ollama.py;  GET /api/tags, /api/ps, /api/version; POST /api/show
    POST /tokenize, /detokenize   the worker's (worker/tokenize.py), through the proxy
    GET  /version, /v1/models/{id}
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from dormant import __version__
from dormant.errors import InvalidRequest, ModelNotFound
from dormant.gateway.apis import anthropic, ollama, openai_responses, relay
from dormant.gateway.apis.chat import read_reply
from dormant.gateway.apis.models import (
    iso,
    max_model_len,
    model_card,
    model_info,
    ollama_details,
    ollama_show,
    ollama_tag,
)
from dormant.gateway.routes import _json_body as json_body  # one body parser and keep_alive for every API
from dormant.gateway.routes import _keep_alive as keep_alive_seconds
from dormant.lifecycle.controller import ReplicaController
from dormant.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from dormant.worker_api import Route

router = APIRouter()


def _replica(request: Request, name: Any, ollama_names: bool = False) -> ReplicaController:
    if not isinstance(name, str) or not name:
        raise InvalidRequest("'model' is required.", param="model")
    fleet = request.app.state.fleet
    if ollama_names and request.app.state.cfg.model(name) is None and name.endswith(":latest"):
        name = name.removesuffix(":latest")  # Ollama's default tag: `smollm2` is `smollm2:latest`
    return fleet.resolve(name)


async def _run(request: Request, body: dict[str, Any], payload: dict[str, Any], path: str,
               translator: relay.Translator | None, *, ollama_names: bool = False) -> dict[str, Any] | Response:
    """Check `payload` as the worker will (a bad request wakes no model), then send it: the
    translated stream, or the worker's JSON body."""
    parse_request(ChatCompletionRequest if path == Route.CHAT_COMPLETIONS else CompletionRequest, payload)
    replica = _replica(request, body.get("model"), ollama_names)
    keep_alive = keep_alive_seconds(body.get("keep_alive"))
    if translator is not None:
        return await relay.stream(request, replica, path, payload, keep_alive, translator)
    return await relay.complete(request, replica, path, payload, keep_alive)


@router.post("/v1/responses")
async def responses(request: Request) -> Response:
    body = await json_body(request)
    payload = openai_responses.to_chat(body)
    model, response_id = body.get("model"), openai_responses.new_response_id()
    stream = openai_responses.ResponseStream(body, model, response_id) if payload.get("stream") else None
    out = await _run(request, body, payload, Route.CHAT_COMPLETIONS, stream)
    if isinstance(out, Response):
        return out
    return JSONResponse(openai_responses.from_reply(read_reply(out), body, model, response_id))


@router.post("/v1/messages")
async def messages(request: Request) -> Response:
    body = await json_body(request)
    payload = anthropic.to_chat(body)
    model, message_id = body.get("model"), anthropic.new_message_id()
    stream = anthropic.MessageStream(model, message_id) if payload.get("stream") else None
    out = await _run(request, body, payload, Route.CHAT_COMPLETIONS, stream)
    if isinstance(out, Response):
        return out
    return JSONResponse(anthropic.from_reply(read_reply(out), model, message_id))


async def _ollama(request: Request, chat: bool) -> Response:
    started = time.monotonic()
    body = await json_body(request)
    payload, path = (ollama.chat_to_chat if chat else ollama.generate_to_chat)(body)
    model = body.get("model")
    if ollama.is_load_only(body, chat):
        return JSONResponse(await _load_or_unload(request, body, chat))
    raw = path == Route.COMPLETIONS
    stream = ollama.OllamaStream(model, chat, started, raw=raw) if payload["stream"] else None
    out = await _run(request, body, payload, path, stream, ollama_names=True)
    if isinstance(out, Response):
        return out
    reply = ollama.completion_reply(out) if raw else read_reply(out)
    return JSONResponse(ollama.reply_body(reply, model, chat, started))


async def _load_or_unload(request: Request, body: dict[str, Any], chat: bool) -> dict[str, Any]:
    """Ollama's preload (an empty prompt) and unload (the same with keep_alive 0): the model is
    started, or woken, as a request would, and kept for `keep_alive`."""
    replica = _replica(request, body.get("model"), ollama_names=True)
    keep_alive = keep_alive_seconds(body.get("keep_alive"))
    if keep_alive == 0:
        await replica.unload()
        reason = "unload"
    else:
        ticket = await replica.enter(keep_alive)
        try:
            await ticket.admitted
        finally:
            replica.leave(ticket)
        reason = "load"
    empty = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
    return {"model": body.get("model"), "created_at": ollama.now(), **empty, "done": True, "done_reason": reason}


@router.post("/api/chat")
async def ollama_chat(request: Request) -> Response:
    return await _ollama(request, chat=True)


@router.post("/api/generate")
async def ollama_generate(request: Request) -> Response:
    return await _ollama(request, chat=False)


@router.get("/api/tags")
async def ollama_tags(request: Request) -> Response:
    specs = request.app.state.cfg.models
    tags = await asyncio.gather(*(asyncio.to_thread(ollama_tag, s) for s in specs))
    return JSONResponse({"models": list(tags)})


@router.get("/api/ps")
async def ollama_ps(request: Request) -> Response:
    """The models with a worker holding them: their size is the worker's memory."""
    out = []
    for replica in request.app.state.fleet.replicas():
        snap = replica.snapshot()
        if not snap.state.has_process:
            continue
        info = await asyncio.to_thread(model_info, replica.spec)
        expires = iso(snap.idle_until) if snap.idle_until and snap.idle_until < 253402300799 else None
        stats = await _stats(snap)
        out.append({"name": replica.spec.id, "model": replica.spec.id, "digest": info.digest if info else "",
                    "size": stats.rss_bytes if stats else 0, "details": ollama_details(info), "expires_at": expires,
                    "context_length": await max_model_len(replica, request.app.state.max_model_lens)})
    return JSONResponse({"models": out})


async def _stats(snap):
    if snap.client is None or snap.state.value != "ready":
        return None
    try:
        return await snap.client.stats(timeout=2.0)
    except Exception:  # noqa: BLE001 - the listing goes on without the figure
        return None


@router.post("/api/show")
async def ollama_show_route(request: Request) -> Response:
    body = await json_body(request)
    replica = _replica(request, body.get("model") or body.get("name"), ollama_names=True)
    context = await max_model_len(replica, request.app.state.max_model_lens)
    return JSONResponse(await asyncio.to_thread(ollama_show, replica.spec, context))


@router.get("/api/version")
async def ollama_version() -> Response:
    return JSONResponse({"version": __version__})


@router.get("/version")
async def version() -> Response:
    return JSONResponse({"version": __version__})


async def _worker_json(request: Request, path: str) -> Response:
    body = await json_body(request)
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    replica = _replica(request, body.get("model"))
    out = await relay.complete(request, replica, path, body, keep_alive_seconds(body.get("keep_alive")))
    return out if isinstance(out, Response) else JSONResponse(out)


@router.post(Route.TOKENIZE)
async def tokenize(request: Request) -> Response:
    return await _worker_json(request, Route.TOKENIZE)


@router.post(Route.DETOKENIZE)
async def detokenize(request: Request) -> Response:
    return await _worker_json(request, Route.DETOKENIZE)


@router.get(Route.MODELS + "/{model_id:path}")
async def retrieve_model(request: Request, model_id: str) -> Response:
    spec = request.app.state.cfg.model(model_id)
    if spec is None:
        raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")
    return JSONResponse((await model_card(request, request.app.state.fleet.resolve(model_id))).model_dump())
