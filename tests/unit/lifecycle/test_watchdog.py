"""The liveness watchdog (watchdog.py, issue 15 item 5) against the fake worker and clock: a
worker whose /health goes unanswered probe after probe is killed and started again for the
requests held meanwhile; a busy but answering one is left alone, however long it works."""

from __future__ import annotations

import pytest

from dormant.lifecycle.states import State as S
from dormant.lifecycle.watchdog import LivenessProbe

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(10)]

PROBE = LivenessProbe(interval=5.0, timeout=5.0, failures=3)


async def probe(r, times: int = 1) -> None:
    """Let `times` probes come due, each answered before the next is armed."""
    for _ in range(times):
        worker, before = r.worker, r.worker.probes
        await r.until(lambda: PROBE.interval in r.clock.pending())
        r.clock.advance(PROBE.interval)
        await r.until(lambda w=worker, n=before + 1: w.probes == n)
        await r.settled()


async def test_a_hung_worker_is_killed_and_restarted_for_the_held_request(make):
    r = make(liveness=PROBE, max_concurrent_requests=1)
    running = await r.admitted()
    held = await r.enter()  # waits behind the running one
    hung = r.worker
    hung.healthy = False
    await probe(r, 2)
    assert hung.returncode is None and r.state is S.READY  # two misses: not yet
    await probe(r)
    assert "kill" in hung.calls and hung.returncode == -9
    r.c.leave(running)  # its connection died with the worker: the gateway ends it
    assert await held.admitted is r.launcher.workers[1]  # cold -> starting -> ready, for it
    assert r.path()[-4:] == [S.READY, S.COLD, S.STARTING, S.READY]
    r.c.leave(held)
    await r.until(lambda: r.c.snapshot().in_flight == 0)
    await probe(r)  # the new worker is watched from its start
    assert r.worker.probes == 1 and r.state is S.READY


async def test_a_busy_worker_that_answers_health_is_never_killed(make):
    """A long generation: the request stays in flight for 20 probes, each answered."""
    r = make(liveness=PROBE)
    running = await r.admitted()
    await probe(r, 20)
    assert "kill" not in r.worker.calls and r.state is S.READY and len(r.launcher.workers) == 1
    r.c.leave(running)


async def test_only_misses_in_a_row_count(make):
    r = make(liveness=PROBE)
    await r.served()
    for _ in range(3):
        r.worker.healthy = False
        await probe(r, PROBE.failures - 1)
        r.worker.healthy = True
        await probe(r)
    assert "kill" not in r.worker.calls and r.state is S.READY


async def test_an_operation_in_flight_is_not_probed_and_a_hung_sleeping_worker_is_killed(make):
    """A sleep may keep the worker's loop busy: no probe then; asleep, it is probed again,
    and a hung asleep worker goes cold, the next request starting a new one."""
    r = make(liveness=PROBE, sleep_after=5)
    await r.served()
    asleep = r.gate("sleep")
    r.clock.advance(5)  # the sleep tier and a probe come due together
    await r.reach(S.SLEEPING)
    await r.settled()
    r.worker.healthy = False
    before = r.worker.probes
    for _ in range(4):
        await r.until(lambda: PROBE.interval in r.clock.pending())
        r.clock.advance(PROBE.interval)
        await r.settled()
    assert r.worker.probes == before and r.state is S.SLEEPING
    asleep.set()
    await r.reach(S.ASLEEP)
    await probe(r, PROBE.failures)
    await r.reach(S.COLD)
    assert "kill" in r.launcher.workers[0].calls
    assert await (await r.enter()).admitted is r.launcher.workers[1]


async def test_no_probe_is_left_armed_once_the_worker_is_gone(make):
    r = make(liveness=PROBE)
    await r.served()
    await r.c.unload()
    assert r.state is S.STOPPED
    await r.settled()
    r.clock.advance(PROBE.interval)  # a probe armed for the old worker is dropped, not re-armed
    await r.settled()
    assert r.clock.pending() == [] and r.worker.probes == 0
