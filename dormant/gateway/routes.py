"""Routes: the OpenAI API, admin (/running, /unload), /metrics, /health. Thin: parse, route, forward."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from dormant.durations import DurationError, parse_duration
from dormant.engines.base import get_engine
from dormant.errors import InvalidRequest
from dormant.lifecycle.states import ReplicaSnapshot
from dormant.lifecycle.fleet import Fleet
from dormant.lifecycle.placement import Replica
from dormant.protocol import ChatCompletionRequest, CompletionRequest, ModelList, parse_request
from dormant.gateway.apis.models import model_card
from dormant.gateway.body import parse_json
from dormant.gateway.proxy import Forward, Proxy, worker_payload
from dormant.worker_api import Route, WorkerStats

router = APIRouter()


def _fleet(request: Request) -> Fleet:
    return request.app.state.fleet


async def _json_body(request: Request, *, required: bool = True) -> Any:
    raw = await request.body()
    if not raw.strip():
        if required:
            raise InvalidRequest("The request body is empty; send a JSON object.")
        return {}
    return await parse_json(raw)


def _keep_alive(value: Any) -> float | None:
    """Seconds, NEVER, or None (the model's own tiers); durations.py refuses NaN and makes
    anything huge never."""
    if value is None:
        return None
    try:
        return parse_duration(value, "keep_alive")
    except DurationError as exc:
        raise InvalidRequest(str(exc), param="keep_alive") from None


async def _openai(request: Request, model_cls: type, path: str) -> Response:
    body = await _json_body(request)
    own = _own_server_replica(request, body)
    if own is not None:  # vLLM: the body goes as it is; what vLLM serves, it validates itself
        options = body.get("stream_options")
        stream = body.get("stream") is True
        wants_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
        replica, keep_alive = own, body.get("keep_alive")
    else:
        req = parse_request(model_cls, body)
        replica, stream, wants_usage, keep_alive = _fleet(request).resolve(req.model), bool(req.stream), \
            req.include_usage, req.keep_alive
    fwd = Forward(
        replica=replica, path=path, keep_alive=_keep_alive(keep_alive), stream=stream,
        client_wants_usage=wants_usage,
        payload=worker_payload(body, replica.spec.id, stream, wants_usage), request=request,
    )
    proxy: Proxy = request.app.state.proxy
    return await proxy.forward(fwd)


def _own_server_replica(request: Request, body: Any):
    """The replica of the body's model when its engine is its own OpenAI server (vllm); else None."""
    name = body.get("model") if isinstance(body, dict) else None
    if not isinstance(name, str) or _fleet(request).cfg.model(name) is None:
        return None
    replica = _fleet(request).resolve(name)
    return replica if get_engine(replica.spec.engine).server_command is not None else None


@router.post(Route.CHAT_COMPLETIONS)
async def chat_completions(request: Request) -> Response:
    return await _openai(request, ChatCompletionRequest, Route.CHAT_COMPLETIONS)


@router.post(Route.COMPLETIONS)
async def completions(request: Request) -> Response:
    return await _openai(request, CompletionRequest, Route.COMPLETIONS)


@router.get(Route.MODELS)
async def list_models(request: Request) -> Response:
    cards = await asyncio.gather(*(model_card(request, r) for r in _fleet(request).replicas()))
    return JSONResponse(ModelList(data=list(cards)).model_dump())


@router.get(Route.HEALTH)
async def health() -> Response:
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return PlainTextResponse(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/running")
async def running(request: Request) -> Response:
    """llama-swap's shape: one entry per replica, with the worker's RSS and its whole /stats
    (`worker_stats`): a worker answers only the gateway (its secret), so this is where an
    operator reads it."""
    fleet = _fleet(request)
    snaps = [r.snapshot() for r in fleet.replicas()]
    stats = await asyncio.gather(*(_worker_stats(s) for s in snaps))
    placed = [fleet.placer.view(s) for s in snaps]
    return JSONResponse({"running": [_running_entry(s, w, p) for s, w, p in zip(snaps, stats, placed)]})


@router.post("/unload")
async def unload(request: Request) -> Response:
    """Drain and stop `model` (JSON body or query), or every model when absent."""
    body = await _json_body(request, required=False)
    name = request.query_params.get("model") or (body.get("model") if isinstance(body, dict) else None)
    unloaded = await _fleet(request).unload(name)
    return JSONResponse({"unloaded": unloaded})


def _running_entry(s: ReplicaSnapshot, stats: WorkerStats | None, placed: Replica) -> dict[str, Any]:
    """One replica; `tier`, `device` and the bytes it holds on its device, in host RAM and on
    disk are the placer's figures (issue 10), measured by the worker once it has run."""
    on_device = placed.device_bytes if placed.device != "cpu" else 0
    in_host = placed.host_bytes + (placed.device_bytes if placed.device == "cpu" else 0)
    return {
        "model": s.model, "engine": s.engine, "state": s.state.value, "tier": placed.tier.value,
        "device": placed.device, "pid": s.pid, "port": s.port,
        "gpu_bytes": on_device, "host_bytes": in_host, "disk_bytes": placed.disk_bytes,
        "last_used": _iso(s.last_used), "pinned": placed.pinned,
        "memory_bytes": stats.rss_bytes if stats else None, "idle_until": _iso(s.idle_until),
        "in_flight": s.in_flight, "queued": s.queued, "max_concurrent_requests": s.max_concurrent,
        "worker_stats": stats.to_dict() if stats else None,
        "suspension": None if s.suspension is None else {
            "pids": list(s.suspension.pids), "host_bytes": s.suspension.host_bytes,
            "suspend_seconds": s.suspension.seconds},
        "suspend_skipped": s.suspend_skipped,
    }


def _iso(when: float | None) -> str | None:
    if when is None:
        return None
    try:
        return dt.datetime.fromtimestamp(when, tz=dt.timezone.utc).isoformat()
    except (OverflowError, ValueError, OSError):  # past year 9999 (a config's huge duration): no date
        return None


async def _worker_stats(s: ReplicaSnapshot) -> WorkerStats | None:
    """The worker's /stats; while it is suspended, those it gave at its start (a suspended
    worker's CUDA calls wait on the driver's lock: a route that made one would hang)."""
    if s.state.value in ("suspending", "suspended", "resuming"):
        return s.stats
    if s.client is None or s.state.value in ("starting", "stopping"):
        return None
    try:
        return await s.client.stats(timeout=2.0)
    except (httpx.HTTPError, RuntimeError):
        return None
