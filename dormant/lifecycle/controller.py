"""One replica's lifecycle: a state machine owned by a single asyncio task.

    cold/stopped/ ──request──▶ starting ──/health 200──▶ ready ◀───────────── waking
    hibernated ▲ ▲                  │ exit / timeout        │ idle (sleep tier)     ▲
         │     │ └──────────────────┘ (held requests: 503)  ▼                       │ request
         │     │                                         draining ──in-flight 0──▶ sleeping ──▶ asleep
         │     │                                            │ (hibernate/stop tier, unload)      │
         │     └─────── stopping ◀──────────────────────────┴────────────────────────────────────┘
         └── hibernated ──(stop tier: image deleted)──▶ stopped
    a worker that exits on its own (crash) sends any state with a process to cold.
    Hibernate: POST /hibernate (the worker makes sure its engine image is written), then stop;
    the next start restores from the image. The stop tier also deletes the image.

Only the controller's task changes its state. Callers send commands and await the outcome
(`enter`, `leave`, `unload`, `shutdown`); they never inspect the state first. The idle rules
(when to sleep or stop) come from `policy.py`; the worker mechanics from `process.py`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import httpx

from dormant.config import ModelSpec
from dormant.errors import ModelUnavailable, QueueFull
from dormant.lifecycle.policy import IdleAction, idle_plan
from dormant.lifecycle.process import WorkerProcess, WorkerStartFailed
from dormant.lifecycle.states import NullObserver, Observer, ReplicaSnapshot, State, Ticket
from dormant.store.images import delete_image

log = logging.getLogger("dormant.lifecycle")

Launch = Callable[[ModelSpec], Awaitable[WorkerProcess]]
MAX_RETRY_BACKOFF_SECONDS = 60.0


class ReplicaController:
    def __init__(self, spec: ModelSpec, *, launch: Launch, start_timeout: float,
                 client: httpx.AsyncClient, observer: Observer | None = None) -> None:
        self.spec = spec
        self._launch = launch
        self._start_timeout = start_timeout
        self._client = client
        self._observer = observer or NullObserver()
        self._inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        # -- owned by the controller task --
        self._state = State.COLD
        self._worker: WorkerProcess | None = None
        self._waiters: collections.deque[Ticket] = collections.deque()
        self._running = 0
        self._op: asyncio.Task | None = None
        self._op_kind = ""
        self._op_started = 0.0
        self._drain_to: IdleAction | None = None
        self._unload_waiters: list[asyncio.Future] = []
        self._idle_since: float | None = None
        self._keep_alive: float | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._idle_gen = 0
        self._idle_until_wall: float | None = None
        self._keep_warm = spec.min_replicas > 0
        self._retry_backoff = 1.0
        self._retry_not_before = 0.0
        self._closing = False
        self._drop_image = False  # the idle stop tier deletes the engine image too
        self._image_dir: str | None = None  # the worker's engine image (from its /stats)
        self._start_tier = "cold"  # the state a start began from: "cold" or "hibernated"

    # ---- commands -----------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the controller task (keep-warm replicas start their worker at once)."""
        self._task = asyncio.create_task(self._run(), name=f"replica:{self.spec.id}")
        self._post("kick")

    async def enter(self, keep_alive: float | None = None) -> Ticket:
        """Take a place for one request; await `ticket.admitted` for the worker, then `leave`.

        From each state:
          cold, stopped   held; starts the worker (concurrent arrivals share that one start)
          starting        held; admitted once /health answers
          ready           admitted at once below max_concurrent_requests, else held in order
          draining,       held; once the drain ends (asleep or stopped) the replica wakes or
          sleeping,       starts again for it: a held request is never lost
          stopping
          asleep          held; wakes the worker
          waking          held; admitted once awake
        Any state: QueueFull (429) when running + held already fill max_concurrent_requests +
        max_queue; `admitted` raises ModelUnavailable (503) if the start fails or the gateway
        shuts down.
        """
        ticket = Ticket(keep_alive)
        reply: asyncio.Future[Ticket] = asyncio.get_running_loop().create_future()
        self._post("enter", ticket, reply)
        try:
            return await reply
        except asyncio.CancelledError:
            self.leave(ticket)
            raise

    def leave(self, ticket: Ticket) -> None:
        """The request is over (answered, failed or abandoned). Never blocks: safe in `finally`."""
        self._post("leave", ticket)

    async def unload(self) -> None:
        """Stop the worker after draining; returns when it is stopped.

        ready → draining → stopping → stopped; asleep → stopping → stopped; cold/stopped: at
        once; starting/waking/sleeping: after that step ends. Held requests start it again.
        """
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._post("unload", done)
        await done

    async def shutdown(self) -> None:
        """Gateway exit: refuse and fail held requests (503), stop the worker without draining."""
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._post("shutdown", done)
        await done
        if self._task is not None:
            self._task.cancel()

    def snapshot(self) -> ReplicaSnapshot:
        w = self._worker
        return ReplicaSnapshot(
            model=self.spec.id, engine=self.spec.engine, state=self._state,
            pid=w.pid if w else None, port=w.port if w else None, base_url=w.base_url if w else None,
            idle_until=self._idle_until_wall, in_flight=self._running, queued=len(self._waiters),
        )

    # ---- the task -----------------------------------------------------------------------------

    def _post(self, *msg: Any) -> None:
        self._inbox.put_nowait(msg)

    async def _run(self) -> None:
        while True:
            kind, *args = await self._inbox.get()
            try:
                getattr(self, f"_on_{kind}")(*args)
                self._advance()
            except Exception:  # a bug here must not leave requests hanging forever
                log.exception("model %s: controller error handling %s", self.spec.id, kind)

    def _advance(self) -> None:
        """Move towards what demand and policy want; one worker operation at a time."""
        if self._op is not None or self._closing:
            return
        s = self._state
        if s is State.READY:
            if self._drain_to is not None:
                self._set(State.DRAINING)
                return self._advance()
            self._admit()
            if self._running == 0 and not self._waiters:
                self._arm_idle()
        elif s is State.DRAINING:
            if self._running == 0:
                if self._drain_to is IdleAction.SLEEP:
                    self._begin(State.SLEEPING, "sleep", self._op_sleep())
                else:
                    self._begin_exit()
        elif s is State.ASLEEP:
            if self._drain_to in (IdleAction.HIBERNATE, IdleAction.STOP):
                self._begin_exit()
            elif self._waiters:
                self._begin(State.WAKING, "wake", self._op_wake())
            else:
                self._arm_idle()
        elif s is State.HIBERNATED and self._drain_to is IdleAction.STOP and not self._waiters:
            self._begin_exit()
        elif s in (State.COLD, State.STOPPED, State.HIBERNATED):
            self._drain_to = None
            for fut in self._unload_waiters:
                if not fut.done():
                    fut.set_result(None)
            self._unload_waiters.clear()
            if self._waiters or (self._keep_warm and time.monotonic() >= self._retry_not_before):
                self._start_tier = "hibernated" if s is State.HIBERNATED else "cold"
                self._begin(State.STARTING, "start", self._op_start())
            elif self._keep_warm:
                delay = max(0.0, self._retry_not_before - time.monotonic())
                asyncio.get_running_loop().call_later(delay, self._post, "kick")
            elif s is State.HIBERNATED:
                self._arm_idle()

    def _begin_exit(self) -> None:
        """End the worker: hibernate tier -> hibernated; unload -> stopped, the image made
        sure of first, as for hibernation; stop tier -> stopped, the image deleted."""
        if self._drain_to is IdleAction.HIBERNATE:
            self._begin(State.STOPPING, "hibernate", self._op_hibernate())
        elif self._drop_image or self._worker is None:
            self._begin(State.STOPPING, "stop", self._op_stop(drop_image=self._drop_image))
        else:
            self._begin(State.STOPPING, "stop", self._op_hibernate())

    def _admit(self) -> None:
        while self._waiters and self._running < self.spec.max_concurrent_requests:
            ticket = self._waiters.popleft()
            ticket.status = "running"
            self._running += 1
            if not ticket.admitted.done():
                ticket.admitted.set_result(self._worker)

    def _set(self, new: State) -> None:
        old, self._state = self._state, new
        if old is not new:
            log.info("model %s: %s -> %s", self.spec.id, old.value, new.value)
            self._observer.on_transition(self.spec.id, old, new)

    def _begin(self, state: State, kind: str, coro: Awaitable[Any]) -> None:
        self._cancel_idle()
        self._set(state)
        self._op_kind, self._op_started = kind, time.monotonic()
        task = asyncio.ensure_future(coro)
        self._op = task
        task.add_done_callback(lambda t: self._post("op_done", t))

    # ---- idle timer (policy decides; the controller arms and acts) ------------------------------

    def _arm_idle(self) -> None:
        if self._idle_handle is not None:
            return
        now = time.monotonic()
        if self._idle_since is None:
            self._idle_since = now
        step = idle_plan(self.spec, self._keep_alive).next_step(
            is_asleep=self._state is State.ASLEEP, is_hibernated=self._state is State.HIBERNATED)
        if step is None:
            return
        action, at = step
        delay = max(0.0, at - (now - self._idle_since))
        self._idle_gen += 1
        self._idle_handle = asyncio.get_running_loop().call_later(delay, self._post, "idle", self._idle_gen, action)
        self._idle_until_wall = time.time() + delay

    def _cancel_idle(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        self._idle_handle = None
        self._idle_until_wall = None
        self._idle_gen += 1

    # ---- message handlers -------------------------------------------------------------------

    def _on_kick(self) -> None:
        pass

    def _on_enter(self, ticket: Ticket, reply: asyncio.Future) -> None:
        if reply.done():  # the caller went away before we got here
            ticket.status = "done"
            return
        if self._closing:
            ticket.status = "rejected"
            reply.set_exception(ModelUnavailable(f"model {self.spec.id!r}: the server is shutting down"))
            return
        capacity = self.spec.max_concurrent_requests + self.spec.max_queue
        if self._running + len(self._waiters) >= capacity:
            ticket.status = "rejected"
            reply.set_exception(QueueFull(
                f"model {self.spec.id!r} is at capacity ({self.spec.max_concurrent_requests} running, "
                f"{self.spec.max_queue} queued); retry later", retry_after=5))
            return
        self._cancel_idle()
        self._idle_since = None
        self._keep_warm = self.spec.min_replicas > 0
        ticket.status = "waiting"
        self._waiters.append(ticket)
        reply.set_result(ticket)

    def _on_leave(self, ticket: Ticket) -> None:
        if ticket.status == "waiting":
            self._waiters.remove(ticket)
        elif ticket.status == "running":
            self._running -= 1
            if self._running == 0 and not self._waiters:
                self._idle_since = time.monotonic()
                self._keep_alive = ticket.keep_alive
        ticket.status = "done"
        if not ticket.admitted.done():
            ticket.admitted.cancel()

    def _on_idle(self, gen: int, action: IdleAction) -> None:
        if gen != self._idle_gen or self._running or self._waiters:
            return
        self._idle_handle = None
        self._idle_until_wall = None
        if self._state in (State.READY, State.ASLEEP, State.HIBERNATED):
            log.info("model %s: idle, %s", self.spec.id, action.value)
            self._drain_to = action
            self._drop_image = action is IdleAction.STOP

    def _on_unload(self, done: asyncio.Future) -> None:
        if not self._state.has_process and self._op is None:
            done.set_result(None)
            return
        self._unload_waiters.append(done)
        self._drain_to = IdleAction.STOP
        self._drop_image = False  # unload ends the worker; the image stays, as for hibernation
        self._keep_warm = False  # an explicit stop holds until the next request

    def _on_launched(self, worker: WorkerProcess) -> None:
        self._worker = worker
        asyncio.ensure_future(self._watch(worker))

    def _on_exited(self, worker: WorkerProcess, code: int) -> None:
        if worker is not self._worker or self._state in (State.STARTING, State.STOPPING):
            return  # the start/stop operation reports this itself
        log.warning("model %s: worker pid %d exited unexpectedly (code %s)", self.spec.id, worker.pid, code)
        if self._op is not None:
            self._op.cancel()
            self._op = None
        self._worker = None
        self._drain_to = None
        self._schedule_retry()
        self._set(State.COLD)

    def _on_op_done(self, task: asyncio.Task) -> None:
        if task is not self._op:
            return  # cancelled after a crash or at shutdown
        self._op = None
        kind, seconds = self._op_kind, time.monotonic() - self._op_started
        exc = None if task.cancelled() else task.exception()
        if task.cancelled():
            exc = asyncio.CancelledError()
        if kind == "start":
            if exc is None:
                self._retry_backoff = 1.0
                self._set(State.READY)
                report = task.result() or {}
                path = report.get("path", "cold")  # "image": the weights came from the engine image
                self._observer.on_ready(self.spec.id, self._start_tier, seconds)
                self._observer.on_cold_start_phases(self.spec.id, path, report.get("phases", {}))
                log.info("model %s: ready after %.2f s (start from %s, weights from %s)", self.spec.id,
                         seconds, self._start_tier, report.get("weights_source"))
            else:
                self._worker = None
                log.error("model %s: start failed: %s", self.spec.id, exc)
                self._fail_waiters(ModelUnavailable(f"model {self.spec.id!r} failed to start: {exc}", retry_after=10))
                self._schedule_retry()
                self._set(State.COLD)
        elif kind == "sleep":
            if exc is None:
                if self._drain_to is IdleAction.SLEEP:
                    self._drain_to = None
                self._set(State.ASLEEP)
            else:
                log.error("model %s: sleep failed (%s); stopping the worker", self.spec.id, exc)
                self._begin(State.STOPPING, "stop", self._op_stop())
        elif kind == "wake":
            if exc is None:
                self._set(State.READY)
                self._observer.on_ready(self.spec.id, "asleep", seconds)
                log.info("model %s: awake after %.2f s", self.spec.id, seconds)
            else:
                log.error("model %s: wake failed (%s); restarting the worker", self.spec.id, exc)
                self._begin(State.STOPPING, "stop", self._op_stop())
        elif kind == "stop":
            self._worker = None
            self._drop_image = False
            self._set(State.STOPPED)
        elif kind == "hibernate":
            self._worker = None
            if self._drain_to is IdleAction.HIBERNATE:
                self._drain_to = None
            self._set(State.HIBERNATED)

    def _on_shutdown(self, done: asyncio.Future) -> None:
        self._closing = True
        self._cancel_idle()
        self._fail_waiters(ModelUnavailable(f"model {self.spec.id!r}: the server is shutting down", retry_after=5))
        op, self._op = self._op, None
        worker = self._worker
        if worker is not None:
            self._set(State.STOPPING)
        asyncio.ensure_future(self._stop_now(op, worker, done))

    async def _stop_now(self, op: asyncio.Task | None, worker: WorkerProcess | None, done: asyncio.Future) -> None:
        if op is not None:
            op.cancel()
            await asyncio.gather(op, return_exceptions=True)
        if worker is not None:
            await worker.stop()
        self._post("stopped_for_shutdown", done)

    def _on_stopped_for_shutdown(self, done: asyncio.Future) -> None:
        if self._worker is not None:
            self._worker = None
            self._set(State.STOPPED)
        done.set_result(None)

    # ---- helpers --------------------------------------------------------------------------------

    def _fail_waiters(self, exc: Exception) -> None:
        while self._waiters:
            ticket = self._waiters.popleft()
            ticket.status = "failed"
            if not ticket.admitted.done():
                ticket.admitted.set_exception(exc)

    def _schedule_retry(self) -> None:
        """Keep-warm replicas restart after a crash or failed start, backing off to 60 s."""
        self._retry_not_before = time.monotonic() + self._retry_backoff
        self._retry_backoff = min(self._retry_backoff * 2, MAX_RETRY_BACKOFF_SECONDS)

    async def _watch(self, worker: WorkerProcess) -> None:
        code = await worker.wait()
        self._post("exited", worker, code)

    # ---- worker operations (mechanism; each runs as the one `_op` task) -------------------------

    async def _op_start(self) -> dict[str, Any]:
        """Launch and wait for /health; returns the worker's cold-start report (its phases)."""
        worker = await self._launch(self.spec)
        self._post("launched", worker)
        try:
            await worker.wait_healthy(self._start_timeout)
        except BaseException:
            await asyncio.shield(worker.stop(grace=2.0))
            raise
        try:
            stats = await worker.stats()
        except (httpx.HTTPError, RuntimeError):
            return {}
        self._image_dir = stats.image_dir or self._image_dir
        return stats.cold_start or {}

    async def _op_hibernate(self) -> None:
        """The worker makes sure its engine image is on disk, then exits; a failure to write
        it is logged and the worker still exits (the next start is then a cold one)."""
        try:
            await self._live_worker().hibernate()
        except (httpx.HTTPError, RuntimeError) as e:
            log.warning("model %s: could not write the engine image before hibernating: %s", self.spec.id, e)
        await self._op_stop()

    async def _op_sleep(self) -> None:
        await self._live_worker().sleep(1)

    async def _op_wake(self) -> None:
        await self._live_worker().wake_up()

    async def _op_stop(self, drop_image: bool = False) -> None:
        if self._worker is not None:
            await self._worker.stop()
        if drop_image and self._image_dir:
            await asyncio.to_thread(delete_image, Path(self._image_dir))
            log.info("model %s: engine image %s deleted (stop tier)", self.spec.id, self._image_dir)

    def _live_worker(self) -> WorkerProcess:
        if self._worker is None:
            raise WorkerStartFailed("no worker")
        return self._worker
