"""ReplicaController, state by state: idle tiers, keep_alive, `unload`, and what a failed sleep,
wake or hibernate does, against the fake worker and clock of conftest.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dormant.durations import NEVER
from dormant.lifecycle.states import State as S
from dormant.worker_api import WorkerControlError

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(10)]


# ---- idle tiers ---------------------------------------------------------------------------------


async def test_idle_tiers_sleep_then_hibernate_then_stop_deleting_the_image(make):
    r = make(sleep_after=10, hibernate_after=20, stop_after=30)
    await r.served()
    worker, image = r.worker, r.worker.image_dir
    assert r.c.snapshot().idle_until == r.clock.time() + 10
    r.clock.advance(9.9)
    assert r.state is S.READY
    r.clock.advance(0.1)
    await r.reach(S.ASLEEP)
    assert r.path()[-4:] == [S.READY, S.DRAINING, S.SLEEPING, S.ASLEEP]
    assert worker.calls[-1] == "sleep" and worker.returncode is None
    assert r.c.snapshot().idle_until == r.clock.time() + 10
    r.clock.advance(10)
    await r.reach(S.HIBERNATED)
    assert r.path()[-2:] == [S.STOPPING, S.HIBERNATED]
    assert worker.calls[-2:] == ["hibernate", "stop"] and image.is_dir()  # the image stays
    assert r.c.snapshot().pid is None
    await r.until(lambda: r.c.snapshot().idle_until == r.clock.time() + 10)
    r.clock.advance(10)
    await r.reach(S.STOPPED)
    assert r.path()[-3:] == [S.HIBERNATED, S.STOPPING, S.STOPPED]
    await r.until(lambda: not image.exists())  # the stop tier deletes it
    assert len(r.launcher.workers) == 1 and r.clock.pending() == []


async def test_the_stop_tier_from_ready_stops_the_worker_and_deletes_its_image(make):
    r = make(sleep_after=NEVER, hibernate_after=NEVER, stop_after=5)
    await r.served()
    worker = r.worker
    r.clock.advance(5)
    await r.reach(S.STOPPED)
    assert r.path()[-4:] == [S.READY, S.DRAINING, S.STOPPING, S.STOPPED]
    assert "hibernate" not in worker.calls and worker.returncode == 0
    await r.until(lambda: not worker.image_dir.exists())


async def test_a_request_resets_the_idle_clock(make):
    r = make(sleep_after=10)
    await r.served()
    r.clock.advance(8)
    ticket = await r.enter()  # the armed tier is dropped
    await ticket.admitted
    assert r.c.snapshot().idle_until is None
    r.clock.advance(5)  # would have been past the old tier
    r.c.leave(ticket)
    await r.until(lambda: r.c.snapshot().idle_until == r.clock.time() + 10)
    assert r.state is S.READY


@pytest.mark.parametrize("keep_alive,due", [(5.0, 5.0), (600.0, 600.0), (0.0, 0.0)])
async def test_keep_alive_on_the_ticket_moves_the_first_tier(make, keep_alive, due):
    r = make(sleep_after=300)
    await r.served(keep_alive=keep_alive)
    assert r.c.snapshot().idle_until == r.clock.time() + due
    r.clock.advance(due)
    await r.reach(S.ASLEEP)


async def test_keep_alive_never_keeps_the_replica_ready(make):
    r = make(sleep_after=0, stop_after=10)
    await r.served(keep_alive=NEVER)
    assert r.c.snapshot().idle_until is None and r.clock.pending() == []
    assert r.state is S.READY


async def test_keep_alive_zero_without_tiers_ends_the_worker_at_once(make):
    r = make()  # no idle tier at all: keep_alive=0 ends the worker (Ollama's)
    await r.served(keep_alive=0)
    r.clock.advance(0)
    await r.reach(S.STOPPED)


# ---- unload, from each state -------------------------------------------------------------------


async def test_unload_when_cold_stopped_or_hibernated_returns_at_once(make):
    r = make(hibernate_after=5)
    await r.c.unload()
    assert r.state is S.COLD and r.launcher.workers == []
    await r.served()
    r.clock.advance(5)
    await r.reach(S.HIBERNATED)
    await r.c.unload()
    assert r.state is S.HIBERNATED


async def test_unload_when_ready_stops_the_worker_and_keeps_its_image(make):
    r = make(min_replicas=1)
    await r.reach(S.READY)
    worker = r.worker
    await r.c.unload()
    assert r.path()[-4:] == [S.READY, S.DRAINING, S.STOPPING, S.STOPPED]
    assert worker.calls[-2:] == ["hibernate", "stop"] and worker.image_dir.is_dir()
    r.clock.advance(3600)  # a keep-warm replica stays stopped until the next request
    await r.c.unload()  # (returns at once: every command before it was handled)
    assert r.state is S.STOPPED and len(r.launcher.workers) == 1
    await r.admitted()
    assert len(r.launcher.workers) == 2


async def test_unload_when_ready_waits_for_in_flight_requests(make):
    r = make()
    ticket = await r.admitted()
    unload = asyncio.ensure_future(r.c.unload())
    await r.reach(S.DRAINING)
    assert not unload.done() and ticket.status == "running"
    r.c.leave(ticket)
    await unload
    assert r.state is S.STOPPED


async def test_unload_when_asleep_stops_the_worker(make):
    r = make(sleep_after=5)
    await r.served()
    r.clock.advance(5)
    await r.reach(S.ASLEEP)
    await r.c.unload()
    assert r.path()[-3:] == [S.ASLEEP, S.STOPPING, S.STOPPED]


async def test_unload_while_starting_stops_once_the_worker_is_up(make):
    r = make()
    healthy = r.gate("wait_healthy")
    r.c.leave(await r.enter())  # the start goes on without the request
    await r.reach(S.STARTING)
    unload = asyncio.ensure_future(r.c.unload())
    await r.settled()
    assert not unload.done() and r.state is S.STARTING
    healthy.set()
    await unload
    assert r.path()[-5:] == [S.STARTING, S.READY, S.DRAINING, S.STOPPING, S.STOPPED]


@pytest.mark.parametrize("step,state,tier", [("sleep", S.SLEEPING, "sleep_after"),
                                             ("stop", S.STOPPING, "stop_after")])
async def test_unload_while_sleeping_or_stopping_stops_once_that_step_ends(make, step, state, tier):
    r = make(**{tier: 5})
    await r.served()
    gate = r.gate(step)
    r.clock.advance(5)
    await r.reach(state)
    unload = asyncio.ensure_future(r.c.unload())
    await r.settled()
    assert not unload.done() and r.state is state
    gate.set()
    await unload
    assert r.state is S.STOPPED


async def test_unload_while_waking_stops_then_starts_again_for_the_held_request(make):
    r = make(sleep_after=5)
    await r.served()
    r.clock.advance(5)
    await r.reach(S.ASLEEP)
    awake = r.gate("wake_up")
    ticket = await r.enter()
    await r.reach(S.WAKING)
    unload = asyncio.ensure_future(r.c.unload())
    await r.settled()
    assert not unload.done() and r.state is S.WAKING
    awake.set()
    await unload
    assert await ticket.admitted is r.launcher.workers[1]  # held requests start it again


# ---- failed worker operations ------------------------------------------------------------------


async def test_a_failed_sleep_stops_the_worker(make):
    r = make(sleep_after=5)
    await r.served()
    r.launcher.fail["sleep"] = r.worker.fail["sleep"] = WorkerControlError("POST /sleep answered 500")
    r.clock.advance(5)
    await r.reach(S.STOPPED)
    assert r.path()[-5:] == [S.READY, S.DRAINING, S.SLEEPING, S.STOPPING, S.STOPPED]
    assert r.worker.calls[-2:] == ["sleep", "stop"]
    assert r.worker.image_dir.is_dir()  # a failed sleep is no stop tier: the image stays


async def test_a_failed_wake_restarts_the_worker_for_the_held_request(make):
    r = make(sleep_after=5)
    await r.served()
    r.clock.advance(5)
    await r.reach(S.ASLEEP)
    first = r.worker
    first.fail["wake_up"] = WorkerControlError("POST /wake_up answered 500")
    ticket = await r.enter()
    assert await ticket.admitted is r.launcher.workers[1]
    assert r.path()[-6:] == [S.ASLEEP, S.WAKING, S.STOPPING, S.STOPPED, S.STARTING, S.READY]
    assert first.returncode == 0


async def test_a_failed_image_write_still_ends_the_worker_and_without_an_image_it_is_stopped(make):
    r = make(hibernate_after=5)
    await r.served()
    image = Path(r.c.snapshot().image_dir)
    (image / "manifest.json").unlink()  # the start's image is gone too: nothing to restore from
    r.worker.fail["hibernate"] = WorkerControlError("POST /hibernate answered 500")
    r.clock.advance(5)
    await r.reach(S.STOPPED)
    assert r.worker.calls[-2:] == ["hibernate", "stop"] and r.worker.returncode == 0


async def test_a_failed_image_write_keeps_the_image_the_start_wrote(make):
    r = make(hibernate_after=5)
    await r.served()
    r.worker.fail["hibernate"] = WorkerControlError("POST /hibernate answered 500")
    r.clock.advance(5)
    await r.reach(S.HIBERNATED)
    assert r.worker.calls[-2:] == ["hibernate", "stop"] and r.c.snapshot().image_dir


async def test_a_start_without_stats_is_still_a_start(make):
    r = make()
    r.launcher.fail["stats"] = WorkerControlError("GET /stats answered 500")
    await r.admitted()
    assert r.state is S.READY and r.observer.ready == ["cold"]
    assert r.observer.phases == [("cold", {})]


async def test_a_crash_while_sleeping_ends_the_sleep_and_sends_the_replica_cold(make):
    r = make(sleep_after=5)
    await r.served()
    r.gate("sleep")
    r.clock.advance(5)
    await r.reach(S.SLEEPING)
    r.worker.crash()
    await r.reach(S.COLD)
    await r.settled()
    assert r.state is S.COLD and r.c.snapshot().pid is None  # the cancelled sleep changes nothing
