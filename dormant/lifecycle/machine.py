"""One replica's state and what each command does to it (the diagram is in controller.py).

Everything here runs on the replica's controller task, one command at a time: nothing here
awaits, and nothing else touches it. `advance` then moves the replica towards what demand and
the idle policy want, with at most one worker operation (operations.py) in flight.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Coroutine

from dormant.config import ModelSpec
from dormant.errors import ModelUnavailable, QueueFull
from dormant.lifecycle import operations
from dormant.lifecycle.admission import Admission
from dormant.lifecycle.checkpoint import CudaCheckpoint, Suspender, SuspendUnavailable, Suspension
from dormant.lifecycle.commands import (Command, Evict, Exited, IdleTimer, Kick, Launched, Op, OpDone, Probed,
                                        ProbeDue, StoppedForShutdown)
from dormant.lifecycle.idle import IdleClock
from dormant.lifecycle.operations import Launch
from dormant.lifecycle.policy import IdleAction
from dormant.lifecycle.states import AnyRoom, Observer, ReplicaSnapshot, Room, State, Ticket
from dormant.lifecycle.watchdog import LivenessProbe, Watchdog
from dormant.lifecycle.worker import Clock, Worker
from dormant.worker_api import SleepUnsupported, WorkerStats

log = logging.getLogger("dormant.lifecycle")

MAX_RETRY_BACKOFF_SECONDS = 60.0
START_FAILED_RETRY_AFTER_SECONDS = 10
SHUTTING_DOWN_RETRY_AFTER_SECONDS = 5
# the states in which nothing but requests has the worker: the watchdog probes it only then
PROBED_STATES = (State.READY, State.DRAINING, State.ASLEEP)


class ReplicaMachine:
    """The replica's state and its worker; each public method is one command (commands.py)."""

    def __init__(self, spec: ModelSpec, *, launch: Launch, start_timeout: float, observer: Observer,
                 clock: Clock, post: Callable[[Command], None], liveness: LivenessProbe | None = None,
                 room: Room | None = None, suspender: Suspender | None = None) -> None:
        self.spec = spec
        self._launch = launch
        self._start_timeout = start_timeout
        self._observer = observer
        self._clock = clock
        self._post = post  # to the controller's inbox: how timers and operations report back
        self._background: set[asyncio.Future] = set()
        self._state = State.COLD
        self._worker: Worker | None = None
        self._requests = Admission(spec, clock, post)
        self._idle = IdleClock(spec, clock, post)
        self._watchdog = Watchdog(spec.id, liveness, clock, post, self._spawn)
        self._op: asyncio.Task | None = None
        self._op_started = 0.0
        self._drain_to: IdleAction | None = None
        self._unload_waiters: list[asyncio.Future] = []
        self._keep_warm = spec.min_replicas > 0
        self._retry_backoff = 1.0
        self._retry_not_before = 0.0
        self._closing = False
        self._drop_image = False  # the idle stop tier deletes the engine image too
        # hibernating writes the engine image first where there is none on disk, but not when
        # a request waits for the room (make_room): on the H200 a start waited 20-25 s for a
        # victim's 16 GB image that the disk budget deleted seconds later (bench_swap)
        self._write_image = True
        self._image_dir: str | None = None  # the worker's engine image (from its stats)
        self._start_tier = "cold"  # the state a start began from: "cold" or "hibernated"
        self._room = room or AnyRoom()
        self._device: str | None = None  # where the placer put the worker
        self._preload = False  # start once, if there is room without evicting anyone
        self._last_used: float | None = None  # wall clock
        self._stats: WorkerStats | None = None
        self._suspender = suspender or CudaCheckpoint()
        self._suspension: Suspension | None = None  # while suspended
        self._suspend_skipped: str | None = None  # why this replica's workers cannot be suspended
        self._resume_started: float | None = None  # a resume then a wake: one "suspended" ready
        self._sleep_unsupported = False  # the engine refused /sleep: the sleep tier stops instead

    def snapshot(self) -> ReplicaSnapshot:
        w = self._worker
        return ReplicaSnapshot(
            model=self.spec.id, engine=self.spec.engine, state=self._state,
            pid=w.pid if w else None, port=w.port if w else None, base_url=w.base_url if w else None,
            idle_until=self._idle.due_at_wall, in_flight=self._requests.num_running,
            queued=len(self._requests.waiting), max_concurrent=self._requests.limit, client=w.client if w else None, last_used=self._last_used,
            device=self._device, image_dir=self._image_dir, stats=self._stats,
            suspension=self._suspension if self._state is State.SUSPENDED else None,
            suspend_skipped=self._suspend_skipped,
        )

    # ---- commands (ReplicaController documents what each does from each state) ------------------

    def enter(self, ticket: Ticket, reply: asyncio.Future) -> None:
        if reply.done():  # the caller went away before we got here
            ticket.status = "done"
            return
        if self._closing:
            ticket.status = "rejected"
            reply.set_exception(ModelUnavailable(f"model {self.spec.id!r}: the server is shutting down"))
            return
        try:
            self._requests.hold(ticket)
        except QueueFull as e:
            reply.set_exception(e)
            return
        self._idle.reset()
        self._keep_warm = self.spec.min_replicas > 0
        self._last_used = self._clock.time()
        ticket.from_tier = self._state.value
        reply.set_result(ticket)

    def leave(self, ticket: Ticket) -> None:
        self._last_used = self._clock.time()
        if self._requests.leave(ticket):
            self._idle.start(ticket.keep_alive)

    def idle(self, timer: IdleTimer) -> None:
        """A tier came due: ready drains to it (to suspend: sleeps first); asleep, suspended and
        hibernated go on to it; any other state, or a request meanwhile, drops it. `advance`
        then acts."""
        if not self._idle.take(timer) or not self._requests.is_idle:
            return  # stale: a request came meanwhile
        action = timer.action
        if self._state in (State.READY, State.ASLEEP, State.SUSPENDED, State.HIBERNATED):
            log.info("model %s: idle, %s", self.spec.id, action.value)
            self._drain_to = action
            self._drop_image = action is IdleAction.STOP
            self._write_image = True

    def evict(self, evict: Evict) -> None:
        """ready and idle: drains to the action; asleep or suspended: hibernates; otherwise
        stays (a request came meanwhile, or it is on its way already): the placer plans again."""
        idle = self._requests.is_idle and self._drain_to in (None, IdleAction.SUSPEND) and self._op is None
        if idle and (self._state is State.READY or (self._state in (State.ASLEEP, State.SUSPENDED)
                                                    and evict.action is IdleAction.HIBERNATE)):
            log.info("model %s: evicted (%s) for %s", self.spec.id, evict.action.value, evict.reason)
            self._observer.on_eviction(self.spec.id, evict.reason, evict.action.value)
            self._drain_to = evict.action
            self._write_image = evict.reason != "make_room"

    def drop_image(self, for_model: str | None) -> None:
        """No process: delete the engine image (the next start is a cold one), for the disk
        budget or to make room for `for_model`'s image."""
        if self._state.has_process or self._op is not None or self._image_dir is None:
            return
        image, self._image_dir = self._image_dir, None
        if for_model is None:
            reason, why = "disk_budget", "disk budget"
        else:
            reason, why = "image_room", f"room for {for_model}'s image"
        self._observer.on_eviction(self.spec.id, reason, "delete_image")
        self._spawn(operations.delete(self.spec, image, why))
        if self._state is State.HIBERNATED:  # nothing left to restore from
            self._idle.disarm()
            self._set(State.STOPPED)

    def preload(self) -> None:
        self._preload = True

    def unload(self, done: asyncio.Future) -> None:
        if not self._state.has_process and self._op is None:
            done.set_result(None)
            return
        self._unload_waiters.append(done)
        self._drain_to = IdleAction.STOP
        self._drop_image = False  # unload ends the worker; the image stays, as for hibernation
        self._keep_warm = False  # an explicit stop holds until the next request

    def exited(self, worker: Worker, code: int) -> None:
        """The worker exited on its own: from ready, draining, sleeping, asleep or waking to
        cold (the operation in flight is dropped; keep-warm restarts after 1, 2, 4... 60 s);
        from starting or stopping the operation itself reports it."""
        if worker is not self._worker or self._state in (State.STARTING, State.STOPPING):
            return  # the start/stop operation reports this itself
        log.warning("model %s: worker pid %d exited unexpectedly (code %s)", self.spec.id, worker.pid, code)
        self._watchdog.forget()
        self._suspension = self._resume_started = None
        if self._op is not None:
            self._op.cancel()
            self._op = None
        self._worker = None
        self._drain_to = None
        self._idle.disarm()  # cold has no idle tier: /running must not show one
        self._schedule_retry()
        self._set(State.COLD)

    def launched(self, worker: Worker) -> None:
        self._worker = worker
        self._spawn(self._watch(worker))
        self._watchdog.watch(worker)

    def probe_due(self, due: ProbeDue) -> None:
        self._watchdog.due(due.worker, is_current=due.worker is self._worker, may_probe=self._state in PROBED_STATES)

    def probed(self, probe: Probed) -> None:
        """A hung worker (its /health unanswered, probe after probe) is killed; its exit then
        takes the crash path: in-flight requests fail as their connections close, the replica
        goes cold, and held requests start a new worker."""
        if self._watchdog.probed(probe.worker, probe.ok) and probe.worker is self._worker:
            probe.worker.kill()

    def op_done(self, op: Op, task: asyncio.Task) -> None:
        """starting: ready, or cold with held requests failed (503); sleeping: asleep, or on a
        failure stopping → stopped (quietly, and without asking again, where the engine cannot
        sleep); waking: ready, or stopping → stopped → starting again for the held requests;
        suspending: suspended, or asleep again where the API cannot suspend it (the tier is
        skipped from then on), or on a failure stopping → stopped; resuming: asleep (a held
        request then wakes it), or on a failure stopping → stopped → starting again; stopping:
        stopped, or hibernated (the hibernate tier, even when the image could not be written)."""
        if task is not self._op:
            return  # cancelled after a crash or at shutdown
        self._op = None
        seconds = self._clock.monotonic() - self._op_started
        exc = asyncio.CancelledError() if task.cancelled() else task.exception()
        match op:
            case Op.START if exc is None:
                self._started(task.result(), seconds)
            case Op.START:
                self._worker = None
                log.error("model %s: start failed: %s", self.spec.id, exc)
                self._requests.fail_all(ModelUnavailable(f"model {self.spec.id!r} failed to start: {exc}",
                                                         retry_after=START_FAILED_RETRY_AFTER_SECONDS))
                self._schedule_retry()
                self._set(State.COLD)
            case Op.SLEEP if exc is None:
                if self._drain_to is IdleAction.SLEEP:
                    self._drain_to = None
                self._set(State.ASLEEP)
            case Op.SLEEP if isinstance(exc, SleepUnsupported):
                log.info("model %s: the engine cannot sleep (%s); its sleep tier stops the worker instead",
                         self.spec.id, exc)
                self._sleep_unsupported = True
                self._drain_to = None
                self._begin(State.STOPPING, Op.STOP, operations.stop(self.spec, self._worker))
            case Op.WAKE if exc is None:
                self._set(State.READY)
                since, self._resume_started = self._resume_started, None
                tier, seconds = ("suspended", self._clock.monotonic() - since) if since else ("asleep", seconds)
                self._observer.on_ready(self.spec.id, tier, seconds)
                log.info("model %s: awake after %.2f s (from %s)", self.spec.id, seconds, tier)
            case Op.SUSPEND if exc is None:
                self._suspension = task.result()
                if self._drain_to is IdleAction.SUSPEND:
                    self._drain_to = None
                self._set(State.SUSPENDED)
                self._observer.on_checkpoint(self.spec.id, "suspend", self._suspension.seconds)
                log.info("model %s: suspended in %.2f s: pids %s, %.2f GiB of GPU state now in host memory",
                         self.spec.id, self._suspension.seconds, list(self._suspension.pids),
                         self._suspension.host_bytes / 2**30)
            case Op.SUSPEND if isinstance(exc, SuspendUnavailable):
                self._suspend_skipped = str(exc)
                if self._drain_to is IdleAction.SUSPEND:
                    self._drain_to = None
                log.info("model %s: suspended tier skipped: %s; it stays asleep until its next tier",
                         self.spec.id, exc)
                self._set(State.ASLEEP)
            case Op.RESUME if exc is None:
                self._suspension = None
                self._set(State.ASLEEP)
                self._observer.on_checkpoint(self.spec.id, "resume", task.result())
                log.info("model %s: resumed in %.2f s", self.spec.id, task.result())
            case Op.SUSPEND | Op.RESUME:
                log.error("model %s: %s failed (%s); stopping the worker", self.spec.id, op.value, exc)
                self._suspension = self._resume_started = None
                self._begin(State.STOPPING, Op.STOP, operations.end_suspended(self.spec, self._worker))
            case Op.SLEEP | Op.WAKE:
                log.error("model %s: %s failed (%s); stopping the worker", self.spec.id, op.value, exc)
                self._resume_started = None
                self._begin(State.STOPPING, Op.STOP, operations.stop(self.spec, self._worker))
            case Op.STOP | Op.HIBERNATE:
                image = task.result() if exc is None else None
                if image:
                    self._image_dir = image
                self._worker = None
                self._suspension = None
                self._drop_image = False
                if op is Op.HIBERNATE and self._drain_to is IdleAction.HIBERNATE:
                    self._drain_to = None
                # an engine that writes images (its start named the folder) hibernates with one
                # to restore from; without it, it is stopped (its next start a cold one) and
                # /running and the tier metrics say so. An engine that writes none (llama.cpp,
                # vLLM) comes back from its model files: hibernated as it always is.
                kept = image is not None or self._image_dir is None
                self._set(State.HIBERNATED if op is Op.HIBERNATE and kept else State.STOPPED)

    def _started(self, stats: WorkerStats | None, seconds: float) -> None:
        self._retry_backoff = 1.0
        self._stats = stats
        self._set(State.READY)
        if stats is not None:
            self._image_dir = stats.image_dir or self._image_dir
            self._requests.capacity = stats.max_num_seqs or self._requests.capacity
        report = stats.cold_start if stats is not None else {}
        path = report.get("path", "cold")  # "image": the weights came from the engine image
        self._observer.on_ready(self.spec.id, self._start_tier, seconds)
        self._observer.on_cold_start_phases(self.spec.id, path, report.get("phases", {}))
        log.info("model %s: ready after %.2f s (start from %s, weights from %s)", self.spec.id,
                 seconds, self._start_tier, report.get("weights_source"))

    def shutdown(self, done: asyncio.Future) -> None:
        self._closing = True
        self._idle.disarm()
        self._requests.fail_all(ModelUnavailable(f"model {self.spec.id!r}: the server is shutting down",
                                                  retry_after=SHUTTING_DOWN_RETRY_AFTER_SECONDS))
        op, self._op = self._op, None
        self._watchdog.forget()
        suspended = self._state in (State.SUSPENDING, State.SUSPENDED, State.RESUMING)
        if self._worker is not None:
            self._set(State.STOPPING)
        self._spawn(self._stop_now(op, self._worker, done, suspended))

    async def _stop_now(self, op: asyncio.Task | None, worker: Worker | None, done: asyncio.Future,
                        suspended: bool) -> None:
        if op is not None:
            op.cancel()
            await asyncio.gather(op, return_exceptions=True)
        if worker is not None and suspended:
            await operations.end_suspended(self.spec, worker)
        elif worker is not None:
            await worker.stop()
        self._post(StoppedForShutdown(done))

    def stopped_for_shutdown(self, done: asyncio.Future) -> None:
        if self._worker is not None:
            self._worker = None
            self._set(State.STOPPED)
        done.set_result(None)

    # ---- towards what demand and policy want -------------------------------------------------

    def advance(self) -> None:
        """Move towards what demand and policy want; one worker operation at a time. Then fail
        the requests held past max_queue_wait, after admitting what can be admitted, except
        during a start or a wake: start_timeout bounds those, and the request would only come
        back to wait on the same start."""
        if self._closing:
            return
        self._step()
        if self._state not in (State.STARTING, State.WAKING):
            self._requests.drop_overdue()

    def _step(self) -> None:
        if self._op is not None:
            return
        s = self._state
        if s is State.READY:
            if self._drain_to is not None:
                self._set(State.DRAINING)
                return self._step()
            self._requests.admit(self._worker)
            if self._requests.is_idle:
                self._idle.arm(can_suspend=self._suspend_skipped is None)
        elif s is State.DRAINING:
            if self._requests.num_running == 0:
                if self._drain_to in (IdleAction.SLEEP, IdleAction.SUSPEND) and self._sleep_unsupported:
                    self._drain_to = None
                    self._begin(State.STOPPING, Op.STOP, operations.stop(self.spec, self._worker))
                elif self._drain_to in (IdleAction.SLEEP, IdleAction.SUSPEND):
                    self._begin(State.SLEEPING, Op.SLEEP, operations.sleep(self._worker, self.spec.sleep_level))
                else:
                    self._begin_exit()
        elif s is State.ASLEEP:
            if self._drain_to in (IdleAction.HIBERNATE, IdleAction.STOP):
                self._begin_exit()
            elif self._requests.waiting and self._claim(may_evict=True):
                if self._drain_to is IdleAction.SUSPEND:
                    self._drain_to = None  # a request came while it slept on its way to suspension
                self._begin(State.WAKING, Op.WAKE, operations.wake_up(self._worker))
            elif self._drain_to is IdleAction.SUSPEND and self._suspend_skipped is None:
                self._begin(State.SUSPENDING, Op.SUSPEND, operations.suspend(self._suspender, self._worker))
            else:
                if self._drain_to is IdleAction.SUSPEND:
                    self._drain_to = None
                self._idle.arm(is_asleep=True, can_suspend=self._suspend_skipped is None)
        elif s is State.SUSPENDED:
            if self._drain_to in (IdleAction.HIBERNATE, IdleAction.STOP):
                self._begin_exit()
            elif self._requests.waiting and self._claim(may_evict=True):
                self._resume_started = self._clock.monotonic()
                self._begin(State.RESUMING, Op.RESUME, operations.resume(self._suspender, self._suspension))
            else:
                self._idle.arm(is_suspended=True)
        elif s is State.HIBERNATED and self._drain_to is IdleAction.STOP and not self._requests.waiting:
            self._begin_exit()
        elif s in (State.COLD, State.STOPPED, State.HIBERNATED):
            self._drain_to = None
            for fut in self._unload_waiters:
                if not fut.done():
                    fut.set_result(None)
            self._unload_waiters.clear()
            wanted = self._requests.waiting or (self._keep_warm and self._clock.monotonic() >= self._retry_not_before)
            if (wanted or self._preload) and self._claim(may_evict=bool(wanted)):
                self._preload = False
                self._start_tier = "hibernated" if s is State.HIBERNATED else "cold"
                self._begin(State.STARTING, Op.START, operations.start(
                    self.spec, self._launch, self._start_timeout, lambda w: self._post(Launched(w))))
            elif wanted:
                pass  # no room yet: the placer kicks this replica when some may have come
            elif self._keep_warm:
                self._clock.call_later(max(0.0, self._retry_not_before - self._clock.monotonic()),
                                       self._post, Kick())
            elif s is State.HIBERNATED:
                self._idle.arm(is_hibernated=True)

    def _claim(self, may_evict: bool) -> bool:
        """Room on a device for a start or a wake (placer.py); a preload without it is dropped,
        a request waits (kicked when something changes, bounded by max_queue_wait); a model that
        can never fit fails its held requests."""
        try:
            device = self._room.claim(self.spec.id, may_evict=may_evict)
        except ModelUnavailable as e:
            self._requests.fail_all(e)
            self._preload = self._keep_warm = False
            return False
        if device is None:
            if self._preload and not may_evict:
                log.info("model %s: not preloaded: no room within the budgets", self.spec.id)
                self._preload = False
            return False
        self._device = device
        return True

    def _begin_exit(self) -> None:
        """End the worker: hibernate tier -> hibernated; unload -> stopped, the image made
        sure of first, as for hibernation; stop tier -> stopped, the image deleted. A suspended
        worker is killed (operations.end_suspended), its image kept but by the stop tier."""
        if self._state is State.SUSPENDED:
            op = Op.HIBERNATE if self._drain_to is IdleAction.HIBERNATE else Op.STOP
            drop = self._image_dir if self._drop_image else None
            self._begin(State.STOPPING, op, operations.end_suspended(self.spec, self._worker, drop, self._image_dir))
        elif self._drain_to is IdleAction.HIBERNATE:
            self._begin(State.STOPPING, Op.HIBERNATE, operations.hibernate(
                self.spec, self._worker, write_image=self._write_image, image_dir=self._image_dir))
        elif self._drop_image or self._worker is None:
            drop = self._image_dir if self._drop_image else None
            self._begin(State.STOPPING, Op.STOP, operations.stop(self.spec, self._worker, drop))
        else:
            self._begin(State.STOPPING, Op.STOP, operations.hibernate(self.spec, self._worker))

    def _set(self, new: State) -> None:
        old, self._state = self._state, new
        if old is not new:
            log.info("model %s: %s -> %s", self.spec.id, old.value, new.value)
            self._observer.on_transition(self.spec.id, old, new)

    def _begin(self, state: State, op: Op, coro: Coroutine[Any, Any, Any]) -> None:
        self._idle.disarm()
        self._set(state)
        self._op_started = self._clock.monotonic()
        task = asyncio.ensure_future(coro)
        self._op = task
        task.add_done_callback(lambda t: self._post(OpDone(op, t)))

    # ---- helpers --------------------------------------------------------------------------------

    def _schedule_retry(self) -> None:
        """Keep-warm replicas restart after a crash or failed start, backing off to 60 s."""
        self._retry_not_before = self._clock.monotonic() + self._retry_backoff
        self._retry_backoff = min(self._retry_backoff * 2, MAX_RETRY_BACKOFF_SECONDS)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _watch(self, worker: Worker) -> None:
        self._post(Exited(worker, await worker.wait()))
