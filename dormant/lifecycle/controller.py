"""One replica's lifecycle: a state machine owned by a single asyncio task.

    cold/stopped/ ──request──▶ starting ──healthy──▶ ready ◀───────────────────── waking
    hibernated ▲ ▲                  │ exit / timeout        │ idle (sleep tier)     ▲
         │     │ └──────────────────┘ (held requests: 503)  ▼                       │ request
         │     │                                         draining ──in-flight 0──▶ sleeping ──▶ asleep
         │     │                                            │ (hibernate/stop tier, unload)      │
         │     └─────── stopping ◀──────────────────────────┴────────────────────────────────────┘
         └── hibernated ──(stop tier: image deleted)──▶ stopped
    asleep ──idle (suspend tier)──▶ suspending ──▶ suspended ──request──▶ resuming ──▶ asleep
       (the driver's checkpoint API, checkpoint.py: 0 GPU bytes; a ready replica sleeps first;
       where the API cannot suspend the worker, back to asleep and the tier is skipped)
    suspended ──(hibernate/stop tier, unload, host budget)──▶ stopping (the worker is killed)
    a worker that exits on its own (crash) sends any state with a process to cold; so does one
    the watchdog kills because its /health went unanswered, probe after probe (watchdog.py).
    Hibernate: the worker makes sure its engine image is written, then stops; the next start
    restores from the image. The stop tier also deletes the image.

Only the controller's task changes its state. Callers send commands (commands.py) and await the
outcome (`enter`, `leave`, `unload`, `shutdown`); they never inspect the state first. The task
hands each command to the state machine (machine.py). The idle rules come from policy.py, the
worker mechanics from operations.py; the worker is reached only through the `Worker` protocol
and time only through a `Clock` (worker.py).
"""

from __future__ import annotations

import asyncio
import logging

from dormant.config import ModelSpec
from dormant.lifecycle.checkpoint import Suspender
from dormant.lifecycle.commands import (Command, DropImage, Enter, Evict, Exited, IdleTimer, Kick, Launched, Leave,
                                        OpDone, Preload, Probed, ProbeDue, Shutdown, StoppedForShutdown, Unload)
from dormant.lifecycle.machine import ReplicaMachine
from dormant.lifecycle.operations import Launch
from dormant.lifecycle.policy import IdleAction
from dormant.lifecycle.states import NullObserver, Observer, ReplicaSnapshot, Room, Ticket
from dormant.lifecycle.watchdog import DEFAULT_LIVENESS, LivenessProbe
from dormant.lifecycle.worker import Clock, LoopClock

log = logging.getLogger("dormant.lifecycle")


class ReplicaController:
    """One replica: `launch` starts a worker for the spec; `start_timeout` bounds its wait for
    health; `observer` sees transitions (metrics); `clock` is the time (the loop's by default);
    `liveness` how the watchdog probes the worker (None: not at all); `suspender` the suspend
    tier's mechanism (checkpoint.CudaCheckpoint by default)."""

    def __init__(self, spec: ModelSpec, *, launch: Launch, start_timeout: float,
                 observer: Observer | None = None, clock: Clock | None = None,
                 liveness: LivenessProbe | None = DEFAULT_LIVENESS, room: Room | None = None,
                 suspender: Suspender | None = None) -> None:
        self.spec = spec
        self._inbox: asyncio.Queue[Command] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._machine = ReplicaMachine(spec, launch=launch, start_timeout=start_timeout,
                                       observer=observer or NullObserver(), clock=clock or LoopClock(),
                                       post=self._post, liveness=liveness, room=room, suspender=suspender)

    # ---- commands -----------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the controller task (keep-warm replicas start their worker at once)."""
        self._task = asyncio.create_task(self._run(), name=f"replica:{self.spec.id}")
        self._post(Kick())

    async def enter(self, keep_alive: float | None = None) -> Ticket:
        """Take a place for one request; await `ticket.admitted` for the worker, then `leave`.

        From each state:
          cold, stopped,  held; starts the worker (concurrent arrivals share that one start)
          hibernated
          starting        held; admitted once the worker is healthy
          ready           admitted at once below the limit (max_concurrent_requests, else the
                          worker's reported capacity: admission.py), else held in order
          draining,       held; once the drain ends (asleep or stopped) the replica wakes or
          sleeping,       starts again for it: a held request is never lost
          stopping
          asleep          held; wakes the worker
          waking          held; admitted once awake
          suspending,     held; once suspended, resumes then wakes the worker
          suspended
          resuming        held; wakes the worker once resumed
        Any state: QueueFull (429) when running + held already fill that limit + max_queue;
        ModelUnavailable (503) once shutting down; `admitted` raises ModelUnavailable if the
        start fails or the gateway shuts down. `keep_alive` (seconds, -1 never) replaces how
        long the replica stays ready after this request.
        """
        ticket = Ticket(keep_alive)
        reply: asyncio.Future[Ticket] = asyncio.get_running_loop().create_future()
        self._post(Enter(ticket, reply))
        try:
            return await reply
        except asyncio.CancelledError:
            self.leave(ticket)
            raise

    def leave(self, ticket: Ticket) -> None:
        """The request is over (answered, failed or abandoned). Never blocks: safe in `finally`.

        waiting: leaves the queue; running: frees its place, and the last one out starts the
        idle clock (with its `keep_alive`); done, rejected, failed: nothing.
        """
        self._post(Leave(ticket))

    async def unload(self) -> None:
        """Stop the worker after draining, keeping its engine image; returns when it is stopped.

        ready → draining (in-flight requests finish) → stopping → stopped; asleep → stopping →
        stopped; suspended → stopping (killed) → stopped; stopping: once stopped; cold, stopped,
        hibernated: at once; starting, waking, sleeping, suspending, resuming: after that step
        ends. A keep-warm replica stays stopped until the next request; requests held meanwhile
        start it again.
        """
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._post(Unload(done))
        await done

    async def shutdown(self) -> None:
        """Gateway exit: refuse and fail held requests (503), stop the worker without draining;
        any operation in progress (start, sleep, wake...) is cancelled."""
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._post(Shutdown(done))
        await done
        if self._task is not None:
            self._task.cancel()

    def evict(self, action: IdleAction, reason: str) -> None:
        """Make room (the placer): an idle ready replica sleeps or hibernates, an asleep or
        suspended one hibernates; one with requests, or mid-operation, stays."""
        self._post(Evict(action, reason))

    def drop_image(self, for_model: str | None = None) -> None:
        """Delete the engine image if no process may read it: for the disk budget, or to make
        room for `for_model`'s image before its cold start. With a process (or an operation
        under way), or no image, nothing happens."""
        self._post(DropImage(for_model))

    def preload(self) -> None:
        """Start now if the budgets allow it without evicting anyone."""
        self._post(Preload())

    def kick(self) -> None:
        """Something changed elsewhere (room may have come): look again."""
        self._post(Kick())

    def snapshot(self) -> ReplicaSnapshot:
        return self._machine.snapshot()

    # ---- the task -----------------------------------------------------------------------------

    def _post(self, command: Command) -> None:
        self._inbox.put_nowait(command)

    async def _run(self) -> None:
        while True:
            command = await self._inbox.get()
            try:
                self._handle(command)
                self._machine.advance()
            except Exception:  # a bug here must not leave requests hanging forever
                log.exception("model %s: controller error handling %s", self.spec.id, command)

    def _handle(self, command: Command) -> None:
        m = self._machine
        match command:
            case Enter(ticket, reply):
                m.enter(ticket, reply)
            case Leave(ticket):
                m.leave(ticket)
            case Unload(done):
                m.unload(done)
            case Evict():
                m.evict(command)
            case DropImage(for_model):
                m.drop_image(for_model)
            case Preload():
                m.preload()
            case Shutdown(done):
                m.shutdown(done)
            case Kick():
                pass  # time passed: `advance` looks again
            case IdleTimer():
                m.idle(command)
            case Launched(worker):
                m.launched(worker)
            case Exited(worker, code):
                m.exited(worker, code)
            case ProbeDue():
                m.probe_due(command)
            case Probed():
                m.probed(command)
            case OpDone(op, task):
                m.op_done(op, task)
            case StoppedForShutdown(done):
                m.stopped_for_shutdown(done)
