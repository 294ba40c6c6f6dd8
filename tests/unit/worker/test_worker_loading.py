"""The worker's server is up before its model: 503 in OpenAI's shape until loaded, and a
model that cannot load still ends the process with exit code 2."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import pytest

from dormant.worker.server import WorkerState, build_app


@pytest.mark.timeout(60)
def test_routes_answer_503_until_the_model_is_attached():
    asyncio.run(_routes_while_loading())


async def _routes_while_loading():
    state = WorkerState(None, None, ["smol"], None)
    transport = httpx.ASGITransport(app=build_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
        assert (await client.get("/health")).status_code == 503
        r = await client.post("/v1/chat/completions", json={"model": "smol", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["message"] == "The model is still loading in this worker."
        for method, path in (("POST", "/v1/completions"), ("POST", "/sleep"), ("POST", "/wake_up"),
                             ("GET", "/is_sleeping"), ("POST", "/hibernate")):
            assert (await client.request(method, path)).status_code == 503, path
        assert [m["id"] for m in (await client.get("/v1/models")).json()["data"]] == ["smol"]
        assert (await client.get("/stats")).json()["loading"] is True


@pytest.mark.timeout(120)
def test_a_model_that_cannot_load_exits_2_after_the_server_started(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dormant.worker", "--source", str(tmp_path / "no-such-model"), "--model-id", "x",
         "--port", "0"], capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no-such-model" in proc.stderr
