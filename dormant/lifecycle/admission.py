"""One replica's requests: held in arrival order, admitted up to a limit: the model's
max_concurrent_requests when set, else the capacity its worker reported (the requests its
engine batches at once, max_num_seqs), else UNREPORTED_CAPACITY until a worker has said.

A ticket moves new → waiting → running → done; rejected (at capacity, shutting down) and
failed (the start failed, held past max_queue_wait, shutdown) end it too. Owned by the
replica's controller task: the timer armed for a held ticket only posts a `Kick`, and the
controller then calls `drop_overdue`.
"""

from __future__ import annotations

import collections
from typing import Callable

from dormant.config import ModelSpec
from dormant.errors import ModelUnavailable, QueueFull
from dormant.lifecycle.commands import Command, Kick
from dormant.lifecycle.states import Ticket
from dormant.lifecycle.worker import Clock, TimerHandle, Worker

QUEUE_FULL_RETRY_AFTER_SECONDS = 5
QUEUE_TIMEOUT_RETRY_AFTER_SECONDS = 5
# the limit before any worker of the replica has reported its capacity (the first start's held
# requests), or for an engine that reports none: the fixed default this limit had before issue 12
UNREPORTED_CAPACITY = 8


class Admission:
    def __init__(self, spec: ModelSpec, clock: Clock, post: Callable[[Command], None]) -> None:
        self.spec = spec
        self.waiting: collections.deque[Ticket] = collections.deque()
        self.num_running = 0
        self._clock = clock
        self._post = post
        self._deadlines: dict[Ticket, tuple[float, TimerHandle]] = {}
        self.capacity: int | None = None  # the last worker's max_num_seqs; kept across restarts

    @property
    def limit(self) -> int:
        """Requests in flight at once: the explicit max_concurrent_requests, else the capacity."""
        return self.spec.max_concurrent_requests or self.capacity or UNREPORTED_CAPACITY

    @property
    def is_idle(self) -> bool:
        return self.num_running == 0 and not self.waiting

    def hold(self, ticket: Ticket) -> None:
        """Queue the ticket; QueueFull when running + held already fill limit + max_queue (the
        ticket is then rejected)."""
        if self.num_running + len(self.waiting) >= self.limit + self.spec.max_queue:
            ticket.status = "rejected"
            raise QueueFull(
                f"model {self.spec.id!r} is at capacity ({self.limit} running, "
                f"{self.spec.max_queue} queued); retry later", retry_after=QUEUE_FULL_RETRY_AFTER_SECONDS)
        ticket.status = "waiting"
        self.waiting.append(ticket)
        wait = self.spec.max_queue_wait
        if wait >= 0:
            handle = self._clock.call_later(wait, self._post, Kick())
            self._deadlines[ticket] = (self._clock.monotonic() + wait, handle)

    def admit(self, worker: Worker | None) -> None:
        """Send held tickets to `worker`, in order, while fewer than `limit` run."""
        while self.waiting and self.num_running < self.limit:
            ticket = self.waiting.popleft()
            self._forget(ticket)
            ticket.status = "running"
            self.num_running += 1
            if not ticket.admitted.done():
                ticket.admitted.set_result(worker)

    def drop_overdue(self) -> None:
        """Every ticket held max_queue_wait or longer fails with a 503 and Retry-After: a
        client told to come back beats one left waiting without bound (issue 15, item 10)."""
        now = self._clock.monotonic()
        for ticket in [t for t in self.waiting if t in self._deadlines and self._deadlines[t][0] <= now]:
            self.waiting.remove(ticket)
            self._fail(ticket, ModelUnavailable(
                f"model {self.spec.id!r}: the request waited {self.spec.max_queue_wait:g} s "
                "(max_queue_wait) without a free place; retry later",
                code="queue_timeout", retry_after=QUEUE_TIMEOUT_RETRY_AFTER_SECONDS))

    def leave(self, ticket: Ticket) -> bool:
        """The ticket is done; True when it was the last one running and none is held."""
        was_running = ticket.status == "running"
        if ticket.status == "waiting":
            self.waiting.remove(ticket)
            self._forget(ticket)
        elif was_running:
            self.num_running -= 1
        ticket.status = "done"
        if not ticket.admitted.done():
            ticket.admitted.cancel()
        return was_running and self.is_idle

    def fail_all(self, exc: Exception) -> None:
        """Every held ticket fails with `exc`; running ones are not touched."""
        while self.waiting:
            self._fail(self.waiting.popleft(), exc)

    def _fail(self, ticket: Ticket, exc: Exception) -> None:
        self._forget(ticket)
        ticket.status = "failed"
        if not ticket.admitted.done():
            ticket.admitted.set_exception(exc)

    def _forget(self, ticket: Ticket) -> None:
        deadline = self._deadlines.pop(ticket, None)
        if deadline is not None:
            deadline[1].cancel()
