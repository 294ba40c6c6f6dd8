"""The lifecycle's vocabulary: replica states, request tickets, snapshots, the observer hook."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from dormant.lifecycle.checkpoint import Suspension
from dormant.worker_api import WorkerClient, WorkerStats


class State(str, Enum):
    COLD = "cold"           # no process; weights only in the store (never started, or crashed)
    STARTING = "starting"   # worker launched, /health not yet 200
    READY = "ready"         # admitting requests
    DRAINING = "draining"   # admitting none; in-flight requests finish, then sleep or stop
    SLEEPING = "sleeping"   # POST /sleep in progress
    ASLEEP = "asleep"       # process alive, weights off the accelerator, KV freed
    WAKING = "waking"       # POST /wake_up in progress
    SUSPENDING = "suspending"  # asleep, its processes' GPU state going to host memory (checkpoint.py)
    SUSPENDED = "suspended"    # process alive, 0 GPU bytes: its GPU state in host memory
    RESUMING = "resuming"      # its GPU state coming back; then asleep
    STOPPING = "stopping"   # worker exiting (SIGTERM, then SIGKILL after a grace)
    STOPPED = "stopped"     # no process, stopped on purpose (idle stop tier, unload, shutdown)
    HIBERNATED = "hibernated"  # no process on purpose (idle hibernate tier); the engine image
                               # stays on disk and the next start restores from it

    @property
    def has_process(self) -> bool:
        return self not in (State.COLD, State.STOPPED, State.HIBERNATED)


class Ticket:
    """One request's place in a replica: new → waiting → running → done (or rejected/failed).

    `admitted` resolves with the Worker (worker.py) to send the request to, or raises
    ModelUnavailable when the start fails or the gateway shuts down.
    """

    def __init__(self, keep_alive: float | None) -> None:
        self.keep_alive = keep_alive
        self.status = "new"
        self.from_tier: str | None = None  # the replica's state when the request came (metrics)
        self.entered_at = time.monotonic()
        self.admitted: asyncio.Future = asyncio.get_running_loop().create_future()


@dataclass(frozen=True)
class ReplicaSnapshot:
    """A read-only view for /running and the gauges."""

    model: str
    engine: str
    state: State
    pid: int | None
    port: int | None
    base_url: str | None
    idle_until: float | None  # wall-clock time of the next idle step, None when none is armed
    in_flight: int
    queued: int
    max_concurrent: int = 0  # requests admitted at once (lifecycle/admission.py's limit)
    last_used: float | None = None  # wall-clock time a request last came or ended
    device: str | None = None  # where the placer put it ("cuda:N", "cpu"); None: not placed yet
    image_dir: str | None = None  # its engine image, when it wrote one
    stats: WorkerStats | None = None  # the worker's /stats after its start (weights, KV bytes)
    suspension: Suspension | None = None  # while suspended: its processes and what moved to host
    suspend_skipped: str | None = None  # why the suspend tier is skipped for this replica, once found
    # the worker's client (it holds the worker's secret), for the admin view's /stats calls
    client: WorkerClient | None = field(default=None, repr=False, compare=False)


class Observer(Protocol):
    """What the gateway's metrics see; the lifecycle never imports the gateway."""

    def on_transition(self, model: str, from_state: State, to_state: State) -> None: ...

    def on_ready(self, model: str, tier: str, seconds: float) -> None:
        """The replica became ready from `tier` ("cold": a full start, "hibernated": a start
        that restored the engine image, "asleep": a wake, "suspended": a resume and a wake)."""

    def on_cold_start_phases(self, model: str, path: str, phases: dict[str, float]) -> None:
        """A worker's own account of its start (worker/profile.py); path "cold" or "image"."""

    def on_checkpoint(self, model: str, op: str, seconds: float) -> None:
        """A suspension ("suspend") or resume ("resume") took `seconds` (the driver's calls)."""

    def on_eviction(self, model: str, reason: str, action: str) -> None:
        """The placer evicted `model` (action "sleep", "hibernate", "delete_image") for `reason`:
        "make_room", "host_budget", "disk_budget" or "image_room" (its image deleted so that
        another model's cold start can write its own)."""


class Room(Protocol):
    """The fleet's placer, as a replica asks it before a start or a wake (placer.py)."""

    def claim(self, model: str, *, may_evict: bool) -> str | None:
        """The device to run on, once there is room there (victims are asked to leave
        meanwhile; the replica is kicked when something changes), None until then.
        ModelUnavailable when the model can never fit."""


class AnyRoom:
    """No budgets: every start and wake goes ahead (a replica outside a fleet, tests)."""

    def claim(self, model: str, *, may_evict: bool) -> str | None:
        return "auto"


class NullObserver:
    def on_transition(self, model: str, from_state: State, to_state: State) -> None:
        pass

    def on_ready(self, model: str, tier: str, seconds: float) -> None:
        pass

    def on_cold_start_phases(self, model: str, path: str, phases: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, model: str, op: str, seconds: float) -> None:
        pass

    def on_eviction(self, model: str, reason: str, action: str) -> None:
        pass
