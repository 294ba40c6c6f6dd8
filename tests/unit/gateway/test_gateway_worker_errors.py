"""The gateway's side of the worker's errors and of clients that leave (issue 15, items 7, 2)."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.responses import Response

from dormant.disconnect import unless_client_leaves
from dormant.gateway.proxy import _worker_failure


def test_a_workers_refusal_keeps_its_type_param_and_code():
    body = json.dumps({"error": {"message": "Token ids in 'prompt' must be in [0, 10).",
                                 "type": "invalid_request_error", "param": "prompt", "code": None}}).encode()
    exc = _worker_failure("m", 400, body)
    assert exc.status_code == 400
    assert exc.to_openai_body()["error"] == {"message": "Token ids in 'prompt' must be in [0, 10).",
                                             "type": "invalid_request_error", "param": "prompt", "code": None}


@pytest.mark.parametrize("status,body", [(500, b'{"error": {"message": "boom", "type": "server_error"}}'),
                                         (400, b"not json"), (422, b'{"error": "flat"}')])
def test_a_worker_failure_is_a_server_error(status, body):
    exc = _worker_failure("m", status, body)
    err = exc.to_openai_body()["error"]
    assert exc.status_code == status and err["type"] == "server_error" and err["message"].startswith("model 'm': ")


class _Client:
    """A request's `receive`: the body's tail once, then http.disconnect when `leave` is set."""

    def __init__(self) -> None:
        self.leave = asyncio.Event()
        self._sent_tail = False

    async def receive(self) -> dict:
        if not self._sent_tail:
            self._sent_tail = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.leave.wait()
        return {"type": "http.disconnect"}


@pytest.mark.timeout(10)
def test_work_is_cancelled_when_the_client_leaves():
    async def run() -> None:
        client, cancelled = _Client(), asyncio.Event()

        async def forever() -> Response:
            try:
                await asyncio.Event().wait()
            finally:
                cancelled.set()
            return Response()

        pending = asyncio.ensure_future(unless_client_leaves(client, forever()))
        await asyncio.sleep(0.05)
        assert not pending.done()
        client.leave.set()
        assert await asyncio.wait_for(pending, 5) is None
        assert cancelled.is_set()

        async def answer() -> Response:
            return Response(status_code=201)

        assert (await unless_client_leaves(_Client(), answer())).status_code == 201

    asyncio.run(run())
