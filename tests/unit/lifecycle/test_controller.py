"""ReplicaController, state by state: requests in and out (`enter`, `leave`), starts, failures,
crashes and shutdown, against the fake worker and clock of conftest.py. Each test follows a line
of the per-state contracts in controller.py's docstrings."""

from __future__ import annotations

import asyncio

import pytest

from dormant.errors import ModelUnavailable, QueueFull
from dormant.lifecycle.states import State as S
from dormant.lifecycle.worker import WorkerStartFailed

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(10)]


# ---- enter, from each state ------------------------------------------------------------------


async def test_enter_from_cold_holds_and_starts_one_worker_for_all_arrivals(make):
    r = make()
    healthy = r.gate("wait_healthy")
    first = await r.enter()
    await r.reach(S.STARTING)
    second = await r.enter()  # starting: held too
    assert (first.status, second.status) == ("waiting", "waiting")
    assert not first.admitted.done() and not second.admitted.done()
    assert r.c.snapshot().queued == 2
    healthy.set()
    assert await first.admitted is r.worker and await second.admitted is r.worker
    assert len(r.launcher.workers) == 1
    assert r.state is S.READY and first.status == second.status == "running"
    assert r.observer.ready == ["cold"]
    assert r.observer.phases == [("image", {"weight_load": 0.5})]
    snap = r.c.snapshot()
    assert (snap.pid, snap.port, snap.base_url) == (r.worker.pid, r.worker.port, r.worker.base_url)
    assert (snap.in_flight, snap.queued) == (2, 0)


async def test_enter_from_stopped_starts_a_new_worker(make):
    r = make()
    await r.served()
    await r.c.unload()
    assert r.state is S.STOPPED and r.c.snapshot().pid is None
    ticket = await r.enter()
    assert await ticket.admitted is r.launcher.workers[1]
    assert r.path()[-3:] == [S.STOPPED, S.STARTING, S.READY]


async def test_enter_from_hibernated_starts_from_the_image(make):
    r = make(hibernate_after=5)
    await r.served()
    r.clock.advance(5)
    await r.reach(S.HIBERNATED)
    await r.admitted()
    assert r.path()[-3:] == [S.HIBERNATED, S.STARTING, S.READY]
    assert r.observer.ready == ["cold", "hibernated"]


async def test_enter_when_ready_admits_below_the_limit_and_holds_above_in_order(make):
    r = make(max_concurrent_requests=2, max_queue=2)
    a, b = await r.admitted(), await r.admitted()
    c, d = await r.enter(), await r.enter()
    assert (c.status, d.status) == ("waiting", "waiting")
    assert (r.c.snapshot().in_flight, r.c.snapshot().queued) == (2, 2)
    r.c.leave(a)
    await c.admitted
    assert not d.admitted.done()
    r.c.leave(b)
    await d.admitted
    assert len(r.launcher.workers) == 1


async def test_enter_at_capacity_is_queue_full_from_any_state(make):
    r = make(max_concurrent_requests=1, max_queue=1)
    r.gate("wait_healthy")
    await r.enter()
    await r.enter()  # starting: one for the limit, one held
    with pytest.raises(QueueFull) as e:
        await r.enter()
    assert e.value.retry_after == 5
    assert r.c.snapshot().queued == 2
    r.launcher.gates["wait_healthy"].set()
    await r.reach(S.READY)  # ready: one running, one held
    with pytest.raises(QueueFull):
        await r.enter()


async def test_enter_when_asleep_wakes_the_worker(make):
    r = make(sleep_after=5)
    await r.served()
    r.clock.advance(5)
    await r.reach(S.ASLEEP)
    assert await (await r.enter()).admitted is r.worker
    assert r.path()[-3:] == [S.ASLEEP, S.WAKING, S.READY]
    assert r.worker.calls.count("wake_up") == 1 and r.observer.ready == ["cold", "asleep"]


async def test_enter_while_waking_is_held_until_awake(make):
    r = make(sleep_after=5)
    await r.served()
    r.clock.advance(5)
    await r.reach(S.ASLEEP)
    awake = r.gate("wake_up")
    first = await r.enter()
    await r.reach(S.WAKING)
    second = await r.enter()
    assert not first.admitted.done() and not second.admitted.done()
    awake.set()
    assert await first.admitted is r.worker and await second.admitted is r.worker
    assert r.worker.calls.count("wake_up") == 1


async def test_enter_while_sleeping_is_held_then_wakes_the_worker(make):
    r = make(sleep_after=5)
    await r.served()
    asleep = r.gate("sleep")
    r.clock.advance(5)
    await r.reach(S.SLEEPING)
    ticket = await r.enter()
    assert ticket.status == "waiting"
    asleep.set()
    assert await ticket.admitted is r.worker
    assert r.path()[-5:] == [S.DRAINING, S.SLEEPING, S.ASLEEP, S.WAKING, S.READY]


async def test_enter_while_draining_is_held_and_starts_the_worker_again(make):
    r = make()
    running = await r.admitted()
    unload = asyncio.ensure_future(r.c.unload())
    await r.reach(S.DRAINING)
    held = await r.enter()
    assert held.status == "waiting" and not unload.done()
    r.c.leave(running)
    await unload
    assert await held.admitted is r.launcher.workers[1]
    assert r.path()[-6:] == [S.READY, S.DRAINING, S.STOPPING, S.STOPPED, S.STARTING, S.READY]


async def test_enter_while_stopping_is_held_and_starts_the_worker_again(make):
    r = make(stop_after=5)
    await r.served()
    stopped = r.gate("stop")
    r.clock.advance(5)
    await r.reach(S.STOPPING)
    ticket = await r.enter()
    assert ticket.status == "waiting"
    stopped.set()
    assert await ticket.admitted is r.launcher.workers[1]
    assert r.path()[-4:] == [S.STOPPING, S.STOPPED, S.STARTING, S.READY]


# ---- start failures and keep-warm ---------------------------------------------------------------


async def test_a_failed_start_fails_held_requests_with_model_unavailable(make):
    r = make()
    r.launcher.fail["wait_healthy"] = WorkerStartFailed("worker exited with code 1 while starting")
    first, second = await r.enter(), await r.enter()
    for ticket in (first, second):
        with pytest.raises(ModelUnavailable) as e:
            await ticket.admitted
        assert e.value.retry_after == 10 and ticket.status == "failed"
    await r.reach(S.COLD)
    assert r.worker.calls[-1] == "stop" and r.c.snapshot().pid is None
    r.launcher.fail.clear()
    await r.admitted()  # the next request starts it again


async def test_keep_warm_starts_at_once_and_retries_a_failed_start_with_backoff(make):
    r = make(min_replicas=1, sleep_after=0)
    await r.reach(S.READY)  # no request needed
    assert r.c.snapshot().idle_until is None and r.clock.pending() == []  # never idles
    r.launcher.fail["wait_healthy"] = WorkerStartFailed("no")
    r.worker.crash()
    await r.reach(S.COLD)
    await r.until(lambda: 1.0 in r.clock.pending())
    r.clock.advance(1.0)  # retry 1 s after the crash; it fails
    await r.until(lambda: len(r.launcher.workers) == 2 and r.state is S.COLD)
    await r.until(lambda: 2.0 in r.clock.pending())  # then 2 s
    r.clock.advance(1.0)
    r.clock.advance(1.0)
    await r.until(lambda: len(r.launcher.workers) == 3 and r.state is S.COLD)
    await r.until(lambda: 4.0 in r.clock.pending())  # then 4 s
    r.launcher.fail.clear()
    r.clock.advance(4.0)
    await r.reach(S.READY)
    r.worker.crash()  # a good start resets the backoff
    await r.reach(S.COLD)
    await r.until(lambda: 1.0 in r.clock.pending())


# ---- leave -------------------------------------------------------------------------------------


async def test_leave_while_waiting_gives_up_the_place(make):
    r = make()
    healthy = r.gate("wait_healthy")
    ticket = await r.enter()
    r.c.leave(ticket)
    await r.until(lambda: r.c.snapshot().queued == 0)
    assert ticket.status == "done" and ticket.admitted.cancelled()
    healthy.set()
    await r.reach(S.READY)
    assert r.c.snapshot().in_flight == 0


async def test_leave_while_running_frees_the_place_and_the_last_one_starts_the_idle_clock(make):
    r = make(sleep_after=10)
    a, b = await r.admitted(), await r.admitted()
    r.c.leave(a)
    await r.until(lambda: r.c.snapshot().in_flight == 1)
    assert r.c.snapshot().idle_until is None  # one still running
    r.clock.advance(8)
    r.c.leave(b)
    await r.until(lambda: r.c.snapshot().idle_until is not None)
    assert r.c.snapshot().idle_until == r.clock.time() + 10  # from the last one out
    assert b.status == "done"


# ---- shutdown ----------------------------------------------------------------------------------


async def test_shutdown_fails_held_requests_and_stops_without_draining(make):
    r = make(max_concurrent_requests=1)
    running = await r.admitted()
    held = await r.enter()
    stopped = r.gate("stop")
    shutdown = asyncio.ensure_future(r.shutdown())
    with pytest.raises(ModelUnavailable):
        await held.admitted
    await r.reach(S.STOPPING)
    with pytest.raises(ModelUnavailable):
        await r.enter()  # refused while shutting down
    stopped.set()
    await shutdown
    assert r.state is S.STOPPED and running.status == "running"  # not drained


async def test_shutdown_while_starting_cancels_the_start_and_stops_the_worker(make):
    r = make()
    r.gate("wait_healthy")
    ticket = await r.enter()
    await r.until(lambda: r.c.snapshot().pid is not None)
    await r.shutdown()
    with pytest.raises(ModelUnavailable):
        await ticket.admitted
    assert r.state is S.STOPPED and r.worker.returncode is not None


# ---- crashes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sleep_first", [False, True], ids=["ready", "asleep"])
async def test_a_worker_that_exits_on_its_own_sends_the_replica_cold(make, sleep_first):
    r = make(sleep_after=5)
    await r.served()
    if sleep_first:
        r.clock.advance(5)
        await r.reach(S.ASLEEP)
    r.worker.crash(-11)
    await r.reach(S.COLD)
    assert r.c.snapshot().pid is None and r.clock.pending() == []  # no request, no keep-warm
    assert await (await r.enter()).admitted is r.launcher.workers[1]
