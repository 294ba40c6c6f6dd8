"""A worker answers only whoever holds its secret (issue 15, item 3): every route but /health
refuses a request without it, a wrong one, or another scheme, with 401 in OpenAI's shape,
before the body is read; worker_api.WorkerClient sends it on every call."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from dormant.worker.server import WorkerState, build_app
from dormant.worker_api import WorkerClient, WorkerControlError, new_token

TOKEN = new_token()
# every route but /health; the worker has no model attached, so one let through answers 503 or 200
GUARDED = [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
           ("POST", "/sleep?level=2"), ("POST", "/wake_up"), ("GET", "/is_sleeping"), ("POST", "/hibernate"),
           ("GET", "/stats"), ("GET", "/openapi.json"), ("GET", "/no-such-route")]
WRONG = [None, "", "Bearer", "Bearer ", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"bearer{TOKEN}",
         f"Basic {TOKEN}", TOKEN, f"Bearer  {TOKEN}", "Bearer sk-the-gateway-key"]


def _client(app, authorization: str | None = None) -> httpx.AsyncClient:
    headers = {} if authorization is None else {"Authorization": authorization}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://worker", headers=headers)


def _run(coro):
    return asyncio.run(coro)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("authorization", WRONG)
def test_every_route_but_health_refuses_a_request_without_the_secret(authorization):
    async def go():
        async with _client(build_app(WorkerState(None, None, ["smol"], None), TOKEN), authorization) as c:
            for method, path in GUARDED:
                # a body that is not JSON: refused for the secret, never parsed (that would be a 400)
                r = await c.request(method, path, content=b"{not json" if method == "POST" else None)
                assert r.status_code == 401, (path, r.text)
                assert r.json() == {"error": {"message": "This worker answers only the dormant gateway that started it.",
                                              "type": "authentication_error", "param": None, "code": "invalid_api_key"}}
                assert r.headers["www-authenticate"].startswith("Bearer")
            assert (await c.get("/health")).status_code == 503  # open: the model is not attached yet

    _run(go())


@pytest.mark.timeout(60)
def test_the_right_secret_reaches_every_route():
    async def go():
        async with _client(build_app(WorkerState(None, None, ["smol"], None), TOKEN), f"Bearer {TOKEN}") as c:
            for method, path in GUARDED:
                r = await c.request(method, path)
                assert r.status_code != 401, (path, r.text)
            assert [m["id"] for m in (await c.get("/v1/models")).json()["data"]] == ["smol"]
            assert (await c.get("/stats")).json()["loading"] is True
            assert (await c.post("/sleep")).status_code == 503  # through the check, to the route

    _run(go())


@pytest.mark.timeout(60)
def test_worker_client_sends_its_secret_on_every_call():
    """Control calls (httpx) and requests (worker_link) alike, to the app served by uvicorn on
    a loopback port, as a worker serves it."""
    import uvicorn

    app = build_app(WorkerState(None, None, ["smol"], None), TOKEN)

    async def go():
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        try:
            async with httpx.AsyncClient() as http:
                right, wrong, none = (WorkerClient(http, f"http://127.0.0.1:{port}", t) for t in (TOKEN, new_token(), None))
                assert (await right.stats()).loading is True
                for client in (wrong, none):
                    with pytest.raises(WorkerControlError, match="401"):
                        await client.stats()
                r = await right.post("/v1/completions", {"model": "smol", "prompt": "hi"})
                assert r.status_code == 503  # let through; the model is still loading
                assert (await wrong.post("/v1/completions", {"model": "smol", "prompt": "hi"})).status_code == 401
                async with right.stream("/v1/completions", {"model": "smol", "prompt": "hi", "stream": True}) as s:
                    assert s.status_code == 503
                async with none.stream("/v1/completions", {"model": "smol", "prompt": "hi", "stream": True}) as s:
                    assert s.status_code == 401
        finally:
            server.should_exit = True
            await serving

    _run(go())


@pytest.mark.timeout(60)
def test_a_worker_started_without_a_secret_answers_anyone():
    """A worker run by hand (no DORMANT_WORKER_TOKEN: the gateway always sets one) is open, as
    `vllm serve` without --api-key is; its log says so (worker/__main__.py)."""
    async def go():
        async with _client(build_app(WorkerState(None, None, ["smol"], None))) as c:
            assert (await c.get("/stats")).status_code == 200

    _run(go())


def test_secrets_are_fresh_and_long():
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100 and min(map(len, tokens)) >= 43  # 32 random bytes, url-safe base64
