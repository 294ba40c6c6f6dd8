"""One replica's liveness watchdog: it probes the worker's GET /health every `interval` while
nothing else has the worker (ready, draining, asleep), and says when `failures` probes in a row
failed: the worker is hung, and the controller kills it (issue 15, item 5).

A worker stopped with SIGSTOP, or wedged in its event loop, still has its process and its
port: without this its requests wait forever and /running says ready. /health is answered by
the worker's event loop while the engine runs in its own thread, so a long generation keeps
answering it; a start, a sleep, a wake or a stop is not probed (each has its own timeout).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Coroutine

from dormant.lifecycle.commands import Probed, ProbeDue
from dormant.lifecycle.worker import Clock, TimerHandle, Worker

log = logging.getLogger("dormant.lifecycle")


@dataclass(frozen=True)
class LivenessProbe:
    """How a worker is probed: every `interval` seconds, each probe given `timeout` seconds;
    `failures` failed probes in a row mean hung (so, at the defaults, 15-30 s from the hang)."""

    interval: float = 5.0
    timeout: float = 5.0
    failures: int = 3


DEFAULT_LIVENESS = LivenessProbe()


class Watchdog:
    """Owned by the replica's machine (machine.py), on its task; `spawn` runs a probe beside it
    and `post` brings the answer back as a command."""

    def __init__(self, model: str, probe: LivenessProbe | None, clock: Clock,
                 post: Callable[[Any], None], spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        self.model = model
        self.probe = probe
        self._clock = clock
        self._post = post
        self._spawn = spawn
        self._worker: Worker | None = None
        self._failures = 0
        self._handle: TimerHandle | None = None

    def watch(self, worker: Worker) -> None:
        """A new worker: probe it from one interval on (never, when the probe is off)."""
        self.forget()
        if self.probe is not None:
            self._worker = worker
            self._arm()

    def forget(self) -> None:
        """The worker is gone or going: no more probes."""
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None
        self._worker = None
        self._failures = 0

    def due(self, worker: Worker, is_current: bool, may_probe: bool) -> None:
        """A probe came due for `worker`: probe it when `may_probe` (no operation has it), else
        look again one interval later; once it is no longer the replica's worker, no more."""
        if worker is not self._worker or self.probe is None:
            return  # stale: armed for a worker watched before
        self._handle = None
        if not is_current:
            self.forget()
        elif may_probe:
            self._spawn(self._probe_once(worker, self.probe.timeout))
        else:
            self._arm()

    def probed(self, worker: Worker, ok: bool) -> bool:
        """A probe's answer; True when `worker` is hung. The next probe is armed only after an
        answer, so probes never pile up on a worker that does not answer."""
        if worker is not self._worker or self.probe is None:
            return False
        if ok:
            self._failures = 0
        else:
            self._failures += 1
            log.warning("model %s: worker pid %d did not answer /health within %.0f s (%d of %d)", self.model,
                        worker.pid, self.probe.timeout, self._failures, self.probe.failures)
            if self._failures >= self.probe.failures:
                log.error("model %s: worker pid %d is hung (%d health probes unanswered); killing it",
                          self.model, worker.pid, self._failures)
                self.forget()
                return True
        self._arm()
        return False

    def _arm(self) -> None:
        if self.probe is not None and self._worker is not None:
            self._handle = self._clock.call_later(self.probe.interval, self._post, ProbeDue(self._worker))

    async def _probe_once(self, worker: Worker, timeout: float) -> None:
        try:
            ok = await worker.is_healthy(timeout)
        except Exception:  # a probe that cannot even be sent is a failed probe
            ok = False
        self._post(Probed(worker, ok))
