"""The suspended tier, state by state, against the fake worker, clock and driver calls of
conftest.py: after sleep the worker is suspended; a request resumes then wakes it; where the API
cannot suspend, the tier is skipped with one log line; a suspended worker that must end is
killed. Also: an engine that refuses /sleep is stopped quietly at its sleep tier."""

from __future__ import annotations

import asyncio
import logging

import pytest

from dormant.durations import NEVER
from dormant.lifecycle.checkpoint import SuspendFailed, SuspendUnavailable
from dormant.lifecycle.states import State as S
from dormant.worker_api import SleepUnsupported

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(10)]
SKIPPED = "suspended tier skipped"


async def suspended(r) -> None:
    await r.served()
    r.clock.advance(10)
    await r.reach(S.ASLEEP)
    r.clock.advance(10)
    await r.reach(S.SUSPENDED)


async def test_asleep_then_suspended_then_hibernated_by_a_kill(make):
    r = make(sleep_after=10, suspend_after=20, hibernate_after=40)
    await suspended(r)
    worker = r.worker
    assert r.path()[-4:] == [S.SLEEPING, S.ASLEEP, S.SUSPENDING, S.SUSPENDED]
    assert r.suspender.calls == [("suspend", worker.pid)]
    snap = r.c.snapshot()
    assert snap.suspension.pids == (worker.pid,) and snap.pid == worker.pid
    assert r.observer.checkpoints == ["suspend"]
    assert snap.idle_until == r.clock.time() + 20
    r.clock.advance(20)
    await r.reach(S.HIBERNATED)
    # its own shutdown would wait on the driver's lock: killed, and no /hibernate asked of it
    assert "kill" in worker.calls and "hibernate" not in worker.calls
    assert worker.image_dir.is_dir() and r.c.snapshot().suspension is None


async def test_a_request_resumes_then_wakes_a_suspended_replica(make):
    r = make(sleep_after=10, suspend_after=20)
    await suspended(r)
    ticket = await r.enter()
    await ticket.admitted
    assert r.path()[-5:] == [S.SUSPENDED, S.RESUMING, S.ASLEEP, S.WAKING, S.READY]
    assert [c for c, _ in r.suspender.calls] == ["suspend", "resume"]
    assert r.observer.checkpoints == ["suspend", "resume"] and r.observer.ready[-1] == "suspended"
    assert ticket.from_tier == "suspended" and len(r.launcher.workers) == 1
    r.c.leave(ticket)


async def test_ready_with_suspend_due_sleeps_first_then_suspends(make):
    r = make(sleep_after=10, suspend_after=10)
    await r.served()
    r.clock.advance(10)
    await r.reach(S.SUSPENDED)
    assert r.path()[-6:] == [S.READY, S.DRAINING, S.SLEEPING, S.ASLEEP, S.SUSPENDING, S.SUSPENDED]
    assert r.worker.calls.count("sleep") == 1


async def test_where_the_api_cannot_suspend_the_tier_is_skipped_with_one_log_line(make, caplog):
    caplog.set_level(logging.INFO, logger="dormant.lifecycle")
    r = make(sleep_after=10, suspend_after=10, hibernate_after=60)
    r.suspender.fail["suspend"] = SuspendUnavailable("cuda-bindings is not installed")
    await r.served()
    r.clock.advance(10)
    await r.until(lambda: r.c.snapshot().suspend_skipped is not None)
    await r.reach(S.ASLEEP)
    assert r.path()[-3:] == [S.ASLEEP, S.SUSPENDING, S.ASLEEP]
    assert r.c.snapshot().suspend_skipped == "cuda-bindings is not installed"
    assert r.c.snapshot().idle_until == r.clock.time() + 50  # on to the next tier at its time
    # a second idle period sleeps at its time and never asks the API again
    ticket = await r.admitted()
    r.c.leave(ticket)
    await r.until(lambda: r.c.snapshot().idle_until == r.clock.time() + 10)
    r.clock.advance(10)
    await r.reach(S.ASLEEP)
    await r.settled()
    assert len(r.suspender.calls) == 1
    assert sum(SKIPPED in rec.getMessage() for rec in caplog.records) == 1
    r.clock.advance(50)
    await r.reach(S.HIBERNATED)
    assert "hibernate" in r.worker.calls  # asleep, not suspended: asked to make sure of its image


async def test_a_request_during_the_suspension_resumes_once_it_is_done(make):
    r = make(sleep_after=10, suspend_after=20)
    gate = asyncio.Event()
    r.suspender.gates["suspend"] = gate
    await r.served()
    r.clock.advance(10)
    await r.reach(S.ASLEEP)
    r.clock.advance(10)
    await r.reach(S.SUSPENDING)
    ticket = await r.enter()
    gate.set()
    await ticket.admitted
    assert r.path()[-6:] == [S.SUSPENDING, S.SUSPENDED, S.RESUMING, S.ASLEEP, S.WAKING, S.READY]
    r.c.leave(ticket)


async def test_a_failed_suspension_kills_the_worker(make):
    r = make(sleep_after=10, suspend_after=20)
    r.suspender.fail["suspend"] = SuspendFailed("cuCheckpointProcessCheckpoint(7) answered CUDA_ERROR_UNKNOWN")
    await r.served()
    r.clock.advance(10)
    await r.reach(S.ASLEEP)
    r.clock.advance(10)
    await r.reach(S.STOPPED)
    assert "kill" in r.worker.calls and r.c.snapshot().suspend_skipped is None


async def test_a_failed_resume_starts_a_new_worker_for_the_held_request(make):
    r = make(sleep_after=10, suspend_after=20)
    await suspended(r)
    first = r.worker
    r.suspender.fail["resume"] = SuspendFailed("cuCheckpointProcessRestore(7) answered CUDA_ERROR_OUT_OF_MEMORY")
    ticket = await r.enter()
    await ticket.admitted
    assert r.path()[-5:] == [S.RESUMING, S.STOPPING, S.STOPPED, S.STARTING, S.READY]
    assert "kill" in first.calls and len(r.launcher.workers) == 2
    r.c.leave(ticket)


async def test_unload_and_shutdown_kill_a_suspended_worker(make):
    r = make(sleep_after=10, suspend_after=20)
    await suspended(r)
    worker = r.worker
    await r.c.unload()
    assert r.state is S.STOPPED and "kill" in worker.calls and "stop" not in worker.calls
    assert worker.image_dir.is_dir()  # unload keeps the image
    r2 = make(sleep_after=10, suspend_after=20)
    await suspended(r2)
    await r2.shutdown()
    assert "kill" in r2.worker.calls and "stop" not in r2.worker.calls


async def test_a_crash_while_suspended_goes_cold(make):
    r = make(sleep_after=10, suspend_after=20)
    await suspended(r)
    r.worker.crash(-9)
    await r.reach(S.COLD)
    assert r.c.snapshot().suspension is None


async def test_an_engine_that_cannot_sleep_is_stopped_quietly_at_its_sleep_tier(make, caplog):
    caplog.set_level(logging.INFO, logger="dormant.lifecycle")
    r = make(sleep_after=10, hibernate_after=NEVER)
    r.launcher.fail["sleep"] = SleepUnsupported("POST /sleep answered 400: level must be none", 400)
    await r.served()
    r.clock.advance(10)
    await r.reach(S.STOPPED)
    assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert sum("cannot sleep" in rec.getMessage() for rec in caplog.records) == 1
    # the next start's sleep tier stops it without asking /sleep again, and without a new line
    await r.served()
    r.clock.advance(10)
    await r.reach(S.STOPPED)
    assert "sleep" not in r.worker.calls and len(r.launcher.workers) == 2
    assert sum("cannot sleep" in rec.getMessage() for rec in caplog.records) == 1
    assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
