"""max_queue_wait: a request held longer than that gets 503 with Retry-After instead of waiting
without bound (issue 15, item 10), driven by the fake clock of conftest.py."""

from __future__ import annotations

import pytest

from dormant.errors import ModelUnavailable
from dormant.lifecycle.states import State as S

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(10)]


async def test_a_request_held_past_max_queue_wait_gets_503_with_retry_after(make):
    r = make(max_concurrent_requests=1, max_queue_wait=30)
    running = await r.admitted()
    held = await r.enter()
    r.clock.advance(29)
    await r.settled()
    assert held.status == "waiting" and not held.admitted.done()
    r.clock.advance(1)
    with pytest.raises(ModelUnavailable) as caught:
        await held.admitted
    assert caught.value.status_code == 503 and caught.value.code == "queue_timeout"
    assert caught.value.headers() == {"Retry-After": "5"}
    assert held.status == "failed" and r.c.snapshot().queued == 0
    assert running.status == "running" and r.state is S.READY  # the running one is untouched


async def test_a_request_admitted_in_time_is_not_failed_later(make):
    r = make(max_concurrent_requests=1, max_queue_wait=30)
    first = await r.admitted()
    held = await r.enter()
    r.clock.advance(10)
    r.c.leave(first)
    assert await held.admitted is r.worker
    r.clock.advance(60)
    await r.settled()
    assert held.status == "running"
    assert r.clock.pending() == []  # its deadline timer was cancelled on admission


async def test_a_start_is_not_cut_short_and_held_requests_are_admitted_after_it(make):
    r = make(max_queue_wait=30)
    healthy = r.gate("wait_healthy")
    held = await r.enter()
    await r.reach(S.STARTING)
    r.clock.advance(100)  # past the bound, but the start has start_timeout of its own
    await r.settled()
    assert held.status == "waiting"
    healthy.set()
    assert await held.admitted is r.worker


async def test_only_those_still_held_after_a_slow_start_get_503(make):
    r = make(max_concurrent_requests=1, max_queue=2, max_queue_wait=30)
    healthy = r.gate("wait_healthy")
    first, second = await r.enter(), await r.enter()
    await r.reach(S.STARTING)
    r.clock.advance(100)
    healthy.set()
    assert await first.admitted is r.worker  # the free place goes first, in arrival order
    with pytest.raises(ModelUnavailable):
        await second.admitted


async def test_minus_one_waits_without_bound(make):
    r = make(max_concurrent_requests=1, max_queue_wait=-1)
    first = await r.admitted()
    held = await r.enter()
    r.clock.advance(10_000)
    await r.settled()
    assert held.status == "waiting"
    r.c.leave(first)
    assert await held.admitted is r.worker


def test_max_queue_wait_is_a_duration_in_the_config(tmp_path):
    from dormant.config import load_config

    path = tmp_path / "dormant.yaml"
    path.write_text("models:\n  smollm2:\n    max_queue_wait: 30s\n")
    assert load_config(path).models[0].max_queue_wait == 30.0
    path.write_text("models:\n  smollm2: {}\n")
    assert load_config(path).models[0].max_queue_wait == 120.0
