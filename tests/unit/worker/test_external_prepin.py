"""The external worker's prepin (worker/external_app.py): the one sleep + wake that pins vLLM's
host buffers runs in idle time, after the request held through the start, never before it.
vLLM's sleep mode needs a GPU, so its dev routes are an httpx.MockTransport here; the relay is
the worker's real app."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from dormant.worker.external_app import ExternalState, build_external_app


class _Body(httpx.AsyncByteStream):
    """A body the relay streams, as vLLM's answers reach it."""

    async def __aiter__(self):
        yield b'{"ok": true}'


@pytest.mark.timeout(30)
def test_the_prepin_waits_for_the_request_that_arrives_just_after_the_start():
    seen: list[str] = []
    answered = asyncio.Event()

    async def vllm(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/v1/completions":
            await answered.wait()  # the request runs until the test lets it end
        return httpx.Response(200, stream=_Body())

    async def go():
        upstream = httpx.AsyncClient(transport=httpx.MockTransport(vllm), base_url="http://vllm")
        # made long before the server is up, as at a worker's start (vLLM took 85 s on the H200)
        state = ExternalState(upstream, sleep_mode=True, started=time.time())
        state.last_request -= 100.0
        state.ready = True
        prepin = asyncio.create_task(state.prepin())
        app = build_external_app(state, token=None)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://worker") as client:
            await asyncio.sleep(0)  # the prepin looks first, as it did on the GPU machine
            request = asyncio.create_task(client.post("/v1/completions", json={"prompt": "hi"}))
            while "/v1/completions" not in seen:
                await asyncio.sleep(0.01)
            assert "/sleep" not in seen  # the request went first
            answered.set()
            assert (await request).status_code == 200
            await asyncio.wait_for(prepin, 10)
        assert seen == ["/v1/completions", "/sleep", "/wake_up"] and not state.is_sleeping
        assert state.cold_start["prepin_seconds"] >= 0
        await upstream.aclose()

    asyncio.run(go())


@pytest.mark.timeout(30)
def test_a_sleep_from_the_gateway_at_the_prepin_s_moment_is_not_undone_by_its_wake():
    """Seen on the H200 (sleep_after 2 s, the prepin's idle 2 s): the gateway's /sleep and the
    prepin began together; the prepin's wake came after that sleep, and the replica the gateway
    counted asleep held its whole KV cache. The sleep that went first pins the buffers: the
    prepin then does nothing."""
    seen: list[str] = []
    release = asyncio.Event()

    async def vllm(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/sleep":
            await release.wait()
        return httpx.Response(200)

    async def go():
        upstream = httpx.AsyncClient(transport=httpx.MockTransport(vllm), base_url="http://vllm")
        state = ExternalState(upstream, sleep_mode=True, started=time.time())
        state.ready = True
        app = build_external_app(state, token=None)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://worker") as client:
            gateway_sleep = asyncio.create_task(client.post("/sleep", params={"level": 1}))
            while "/sleep" not in seen:
                await asyncio.sleep(0.01)
            state.last_request -= 100.0  # idle long enough: the prepin goes now, its sleep waits for the lock
            prepin = asyncio.create_task(state.prepin())
            await asyncio.sleep(0.05)
            release.set()
            assert (await gateway_sleep).status_code == 200
            await asyncio.wait_for(prepin, 10)
        assert seen == ["/sleep"] and state.is_sleeping
        assert "prepin_seconds" not in state.cold_start
        await upstream.aclose()

    asyncio.run(go())
