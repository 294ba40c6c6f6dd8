"""Replica states and the observer hook that sees every transition."""

from __future__ import annotations

from enum import Enum
from typing import Protocol


class State(str, Enum):
    COLD = "cold"           # no process; weights only in the store (never started, or crashed)
    STARTING = "starting"   # worker launched, /health not yet 200
    READY = "ready"         # admitting requests
    DRAINING = "draining"   # admitting none; in-flight requests finish, then sleep or stop
    SLEEPING = "sleeping"   # POST /sleep in progress
    ASLEEP = "asleep"       # process alive, weights off the accelerator, KV freed
    WAKING = "waking"       # POST /wake_up in progress
    STOPPING = "stopping"   # worker exiting (SIGTERM, then SIGKILL after a grace)
    STOPPED = "stopped"     # no process, stopped on purpose (idle stop tier, unload, shutdown)

    @property
    def has_process(self) -> bool:
        return self not in (State.COLD, State.STOPPED)


class Observer(Protocol):
    """What the gateway's metrics see; the lifecycle never imports the gateway."""

    def on_transition(self, model: str, from_state: State, to_state: State) -> None: ...

    def on_ready(self, model: str, tier: str, seconds: float) -> None:
        """The replica became ready from `tier` ("cold": a full start, "asleep": a wake)."""


class NullObserver:
    def on_transition(self, model: str, from_state: State, to_state: State) -> None:
        pass

    def on_ready(self, model: str, tier: str, seconds: float) -> None:
        pass
