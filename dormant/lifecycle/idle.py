"""One replica's idle clock: when the replica last had nothing to do, and the one timer armed
for its next idle tier. policy.py decides which tier comes when; this keeps the time.
"""

from __future__ import annotations

from typing import Callable

from dormant.config import ModelSpec
from dormant.lifecycle.commands import IdleTimer
from dormant.lifecycle.policy import idle_plan
from dormant.lifecycle.worker import Clock, TimerHandle


class IdleClock:
    def __init__(self, spec: ModelSpec, clock: Clock, fire: Callable[[IdleTimer], None]) -> None:
        self.spec = spec
        self._clock = clock
        self._fire = fire
        self._since: float | None = None
        self._keep_alive: float | None = None
        self._handle: TimerHandle | None = None
        self._generation = 0
        self.due_at_wall: float | None = None  # wall-clock time of the armed tier (/running)

    def start(self, keep_alive: float | None) -> None:
        """The last request ended: the clock runs from now, with that request's keep_alive."""
        self._since = self._clock.monotonic()
        self._keep_alive = keep_alive

    def reset(self) -> None:
        """A request arrived: nothing is due; the clock starts again when the replica is idle."""
        self.disarm()
        self._since = None

    def arm(self, is_asleep: bool = False, is_hibernated: bool = False, is_suspended: bool = False,
            can_suspend: bool = True) -> None:
        """Arm a timer for the next tier from here (none if one is armed or none is due)."""
        if self._handle is not None:
            return
        now = self._clock.monotonic()
        if self._since is None:
            self._since = now
        step = idle_plan(self.spec, self._keep_alive).next_step(is_asleep=is_asleep, is_hibernated=is_hibernated,
                                                                is_suspended=is_suspended, can_suspend=can_suspend)
        if step is None:
            return
        action, at = step
        delay = max(0.0, at - (now - self._since))
        self._generation += 1
        self._handle = self._clock.call_later(delay, self._fire, IdleTimer(self._generation, action))
        self.due_at_wall = self._clock.time() + delay

    def disarm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None
        self.due_at_wall = None
        self._generation += 1  # a timer already fired and queued is stale now

    def take(self, timer: IdleTimer) -> bool:
        """True when `timer` is the one armed last (then nothing is armed any more)."""
        if timer.generation != self._generation:
            return False
        self._handle = None
        self.due_at_wall = None
        return True
