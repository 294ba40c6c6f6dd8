"""How many requests a replica admits at once (issue 12): its model's max_concurrent_requests
when set, else the capacity its worker reports (max_num_seqs in /stats), else 8 until a worker
has said; the capacity outlives the worker, so a restart's held requests count on it."""

from __future__ import annotations

import pytest

from dormant.errors import QueueFull
from dormant.lifecycle.admission import UNREPORTED_CAPACITY
from dormant.lifecycle.states import State as S

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


async def test_without_a_cap_the_reported_capacity_is_the_limit(make):
    r = make(max_concurrent_requests=None, max_queue=0)
    r.launcher.capacity = 12
    started = r.gate("wait_healthy")
    tickets = [await r.enter() for _ in range(UNREPORTED_CAPACITY)]  # starting: 8 + max_queue 0 held
    with pytest.raises(QueueFull):
        await r.enter()
    started.set()
    await r.reach(S.READY)
    for t in tickets:
        await t.admitted
    assert r.c.snapshot().max_concurrent == 12
    more = [await r.enter() for _ in range(12 - UNREPORTED_CAPACITY)]
    for t in more:
        assert (await t.admitted) is r.worker
    assert (r.c.snapshot().in_flight, r.c.snapshot().queued) == (12, 0)
    with pytest.raises(QueueFull):  # 12 running, max_queue 0
        await r.enter()


async def test_an_explicit_cap_is_honoured_whatever_the_worker_reports(make):
    r = make(max_concurrent_requests=3, max_queue=5)
    r.launcher.capacity = 64
    tickets = [await r.enter() for _ in range(5)]
    await r.reach(S.READY)
    await r.until(lambda: r.c.snapshot().in_flight == 3)
    assert r.c.snapshot().queued == 2 and r.c.snapshot().max_concurrent == 3
    assert [t.status for t in tickets] == ["running"] * 3 + ["waiting"] * 2
    r.c.leave(tickets[0])
    await tickets[3].admitted
    assert not tickets[4].admitted.done()


async def test_an_engine_that_reports_no_capacity_gets_the_old_default(make):
    r = make(max_concurrent_requests=None, max_queue=4)
    tickets = [await r.enter() for _ in range(UNREPORTED_CAPACITY + 1)]
    await r.reach(S.READY)
    await r.until(lambda: r.c.snapshot().in_flight == UNREPORTED_CAPACITY)
    assert r.c.snapshot().queued == 1 and not tickets[-1].admitted.done()


async def test_the_capacity_outlives_the_worker(make):
    """After the first start reported it, a hibernated replica holds up to capacity + max_queue
    for its restore, not 8 + max_queue."""
    r = make(max_concurrent_requests=None, max_queue=0, hibernate_after=5)
    r.launcher.capacity = 16
    await r.served()
    r.clock.advance(5)
    await r.reach(S.HIBERNATED)
    r.gate("wait_healthy")
    tickets = [await r.enter() for _ in range(16)]  # starting: all 16 held
    with pytest.raises(QueueFull):
        await r.enter()
    r.launcher.gates["wait_healthy"].set()
    for t in tickets:
        await t.admitted
    assert r.c.snapshot().in_flight == 16
