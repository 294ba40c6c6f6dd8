"""Fakes for the lifecycle tests: a worker, its launcher, a clock, an observer, the suspend
tier's driver calls (they need a GPU), and `make`, a fixture that builds a ReplicaController
wired to them (`Replica`).

The fake worker answers every control call at once unless a test closes a gate on it
(`r.gate("sleep")`) or makes it fail (`r.launcher.fail["wake_up"] = ...`); the fake clock moves
only when a test calls `r.clock.advance`, so idle tiers and retry backoffs fire without sleeping.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Callable

import pytest

from dormant.config import ModelSpec
from dormant.durations import NEVER
from dormant.lifecycle.checkpoint import Suspension
from dormant.lifecycle.controller import ReplicaController
from dormant.lifecycle.states import State, Ticket
from dormant.lifecycle.watchdog import LivenessProbe
from dormant.lifecycle.worker import WorkerStartFailed
from dormant.worker_api import WorkerStats


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ---- the fakes ----------------------------------------------------------------------------------


class FakeWorker:
    """Implements lifecycle.worker.Worker in memory."""

    def __init__(self, pid: int, image_dir: Path, gates: dict[str, asyncio.Event],
                 fail: dict[str, Exception], capacity: int | None = None) -> None:
        self.pid = pid
        self.capacity = capacity  # the max_num_seqs its /stats reports (None: says none)
        self.port = 40000 + pid
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.client = None  # the gateway's relay; the controller never uses it
        self.image_dir = image_dir
        self.gates = dict(gates)
        self.fail = dict(fail)
        self.calls: list[str] = []
        self.healthy = True  # what its /health probes answer (False: as a hung worker's time out)
        self.probes = 0
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    @property
    def returncode(self) -> int | None:
        return self._exited.result() if self._exited.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    async def wait_healthy(self, timeout: float) -> None:
        await self._call("wait_healthy")
        if self.returncode is not None:
            raise WorkerStartFailed(f"worker exited with code {self.returncode} while starting")

    async def stop(self, grace: float = 10.0) -> int:
        await self._call("stop")
        self.crash(0)
        return self._exited.result()

    def kill(self) -> None:
        self.calls.append("kill")
        self.crash(-9)

    async def is_healthy(self, timeout: float) -> bool:
        self.probes += 1
        return self.healthy

    async def sleep(self, level: int) -> None:
        await self._call("sleep")

    async def wake_up(self) -> None:
        await self._call("wake_up")

    async def hibernate(self) -> str | None:
        await self._call("hibernate")
        return str(self.image_dir)

    async def stats(self) -> WorkerStats:
        await self._call("stats")
        return WorkerStats(pid=self.pid, rss_bytes=0, image_dir=str(self.image_dir), max_num_seqs=self.capacity,
                           cold_start={"path": "image", "phases": {"weight_load": 0.5}, "weights_source": "image"})

    def crash(self, code: int = -9) -> None:
        if not self._exited.done():
            self._exited.set_result(code)

    async def _call(self, name: str) -> None:
        self.calls.append(name)
        if name in self.gates:
            await self.gates[name].wait()
        if name in self.fail:
            raise self.fail[name]


class FakeLauncher:
    """The controller's `launch`: each call makes a FakeWorker with the current gates and faults,
    whose engine image is a real folder (so the stop tier's delete can be seen)."""

    def __init__(self, images: Path) -> None:
        self.images = images
        self.workers: list[FakeWorker] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.fail: dict[str, Exception] = {}
        self.capacity: int | None = None  # what the workers launched from now on report

    async def __call__(self, spec: ModelSpec) -> FakeWorker:
        image = self.images / f"{spec.id}-image"
        image.mkdir(parents=True, exist_ok=True)
        (image / "manifest.json").write_text("{}")
        worker = FakeWorker(100 + len(self.workers), image, self.gates, self.fail, self.capacity)
        self.workers.append(worker)
        return worker


class FakeSuspender:
    """Stands in for checkpoint.CudaCheckpoint, whose driver calls need a GPU (tests/gpu has the
    real ones): answers at once unless a test gates (`gates["resume"]`) or fails a call."""

    MOVED_BYTES = 1 << 30

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.fail: dict[str, Exception] = {}

    async def suspend(self, pid: int) -> Suspension:
        await self._call("suspend", pid)
        return Suspension((pid,), self.MOVED_BYTES, 0.5)

    async def resume(self, suspension: Suspension) -> float:
        await self._call("resume", suspension.pids[0])
        return 0.25

    async def _call(self, name: str, pid: int) -> None:
        self.calls.append((name, pid))
        if name in self.gates:
            await self.gates[name].wait()
        if name in self.fail:
            raise self.fail[name]


class FakeTimer:
    def __init__(self, at: float, fn: Callable[..., Any], args: tuple) -> None:
        self.at, self.fn, self.args = at, fn, args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Time stands still until `advance`, which runs the timers that came due, in order."""

    WALL_OFFSET = 1_700_000_000.0

    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[FakeTimer] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now + self.WALL_OFFSET

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> FakeTimer:
        timer = FakeTimer(self.now + delay, fn, args)
        self.timers.append(timer)
        return timer

    def pending(self) -> list[float]:
        """Seconds from now of each armed timer."""
        return sorted(t.at - self.now for t in self.timers if not t.cancelled)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = sorted((t for t in self.timers if t.at <= self.now and not t.cancelled), key=lambda t: t.at)
        self.timers = [t for t in self.timers if t not in due]
        for t in due:
            t.fn(*t.args)


class RecordingObserver:
    def __init__(self) -> None:
        self.transitions: list[tuple[State, State]] = []
        self.ready: list[str] = []
        self.phases: list[tuple[str, dict]] = []
        self.evictions: list[tuple[str, str, str]] = []
        self.checkpoints: list[str] = []

    def on_transition(self, model: str, from_state: State, to_state: State) -> None:
        self.transitions.append((from_state, to_state))

    def on_ready(self, model: str, tier: str, seconds: float) -> None:
        self.ready.append(tier)

    def on_cold_start_phases(self, model: str, path: str, phases: dict[str, float]) -> None:
        self.phases.append((path, phases))

    def on_eviction(self, model: str, reason: str, action: str) -> None:
        self.evictions.append((model, reason, action))

    def on_checkpoint(self, model: str, op: str, seconds: float) -> None:
        self.checkpoints.append(op)


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let the controller run until `predicate` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


class Replica:
    """A controller wired to the fakes. Idle tiers and the watchdog are off unless a test sets
    them (`make(liveness=LivenessProbe(...))`)."""

    def __init__(self, images: Path, liveness: LivenessProbe | None = None, **spec_kw: Any) -> None:
        kw = dict(sleep_after=NEVER, hibernate_after=NEVER, stop_after=NEVER, max_concurrent_requests=2,
                  max_queue=2)
        self.spec = ModelSpec(id="m", source="builtin:smollm2", **{**kw, **spec_kw})
        self.clock = FakeClock()
        self.launcher = FakeLauncher(images)
        self.observer = RecordingObserver()
        self.suspender = FakeSuspender()
        self.c = ReplicaController(self.spec, launch=self.launcher, start_timeout=30.0,
                                   observer=self.observer, clock=self.clock, liveness=liveness,
                                   suspender=self.suspender)
        self.shut = False
        self.tickets: list[Ticket] = []

    @property
    def state(self) -> State:
        return self.c.snapshot().state

    @property
    def worker(self) -> FakeWorker:
        return self.launcher.workers[-1]

    async def reach(self, state: State) -> None:
        await until(lambda: self.state is state)

    until = staticmethod(until)

    async def settled(self) -> None:
        """Every command posted so far has been handled (the controller takes one from its
        inbox and handles it without yielding, so an empty inbox means all are done)."""
        await until(lambda: self.c._inbox.empty())

    def path(self) -> list[State]:
        """The states passed through so far, from cold."""
        return [State.COLD] + [to for _, to in self.observer.transitions]

    def gate(self, name: str) -> asyncio.Event:
        """Hold `name` calls (on workers launched from now on, and the current one) until set."""
        event = asyncio.Event()
        self.launcher.gates[name] = event
        if self.launcher.workers:
            self.worker.gates[name] = event
        return event

    async def enter(self, keep_alive: float | None = None) -> Ticket:
        ticket = await self.c.enter(keep_alive)
        self.tickets.append(ticket)
        return ticket

    async def admitted(self, keep_alive: float | None = None) -> Ticket:
        ticket = await self.enter(keep_alive)
        await ticket.admitted
        return ticket

    async def served(self, keep_alive: float | None = None) -> None:
        """One request in and out: the replica is ready and its idle clock runs from now."""
        self.c.leave(await self.admitted(keep_alive))
        await until(lambda: self.c.snapshot().in_flight == 0)

    async def shutdown(self) -> None:
        self.shut = True
        await self.c.shutdown()


@pytest.fixture
async def make(tmp_path):
    made: list[Replica] = []

    def build(liveness: LivenessProbe | None = None, **spec_kw: Any) -> Replica:
        r = Replica(tmp_path / "images", liveness, **spec_kw)
        r.c.start()
        made.append(r)
        return r

    yield build
    for r in made:
        for event in [*r.launcher.gates.values(), *r.suspender.gates.values()]:
            event.set()
        if not r.shut:
            await r.shutdown()
        for ticket in r.tickets:  # a test need not await every failed ticket
            if ticket.admitted.done() and not ticket.admitted.cancelled():
                ticket.admitted.exception()

