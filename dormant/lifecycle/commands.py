"""The messages a replica's controller task handles, one frozen dataclass each.

Callers send the first four (through the controller's methods); the rest the controller sends
itself, from timers and from the tasks that run worker operations. Only the controller task
acts on them, in arrival order.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import Enum

from dormant.lifecycle.policy import IdleAction
from dormant.lifecycle.states import Ticket
from dormant.lifecycle.worker import Worker


@dataclass(frozen=True)
class Enter:
    """A request wants a place; `reply` gets the ticket, or QueueFull / ModelUnavailable."""

    ticket: Ticket
    reply: asyncio.Future


@dataclass(frozen=True)
class Leave:
    ticket: Ticket


@dataclass(frozen=True)
class Unload:
    done: asyncio.Future


@dataclass(frozen=True)
class Shutdown:
    done: asyncio.Future


@dataclass(frozen=True)
class Evict:
    """The placer makes room (placement.py): an idle ready replica drains to `action` (sleep
    or hibernate), an asleep or suspended one hibernates; busy or elsewhere, it stays (the
    placer re-plans)."""

    action: IdleAction
    reason: str


@dataclass(frozen=True)
class DropImage:
    """A replica without a process deletes its engine image: the disk budget is exceeded, or
    (`for_model`) that model's cold start needs the room for its own image."""

    for_model: str | None = None


@dataclass(frozen=True)
class Preload:
    """Start the worker now if the budgets allow without evicting anyone (server start)."""


@dataclass(frozen=True)
class Kick:
    """Nothing happened but time: look again (a keep-warm retry is due)."""


@dataclass(frozen=True)
class IdleTimer:
    """An idle tier is due; stale when `generation` is not the one armed last."""

    generation: int
    action: IdleAction


@dataclass(frozen=True)
class Launched:
    worker: Worker


@dataclass(frozen=True)
class Exited:
    worker: Worker
    code: int


@dataclass(frozen=True)
class ProbeDue:
    """The watchdog's next /health probe of `worker` is due (watchdog.py)."""

    worker: Worker


@dataclass(frozen=True)
class Probed:
    worker: Worker
    ok: bool


class Op(str, Enum):
    """The worker operations; one runs at a time."""

    START = "start"
    SLEEP = "sleep"
    WAKE = "wake"
    SUSPEND = "suspend"
    RESUME = "resume"
    STOP = "stop"
    HIBERNATE = "hibernate"


@dataclass(frozen=True)
class OpDone:
    op: Op
    task: asyncio.Task


@dataclass(frozen=True)
class StoppedForShutdown:
    done: asyncio.Future


Command = (Enter | Leave | Unload | Shutdown | Evict | DropImage | Preload | Kick | IdleTimer | Launched | Exited | ProbeDue | Probed | OpDone
           | StoppedForShutdown)
