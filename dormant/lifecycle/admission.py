"""One replica's requests: held in arrival order, admitted up to max_concurrent_requests.

A ticket moves new → waiting → running → done; rejected (at capacity, shutting down) and
failed (the start failed, shutdown) end it too. Owned by the replica's controller task.
"""

from __future__ import annotations

import collections

from dormant.config import ModelSpec
from dormant.errors import QueueFull
from dormant.lifecycle.states import Ticket
from dormant.lifecycle.worker import Worker

QUEUE_FULL_RETRY_AFTER_SECONDS = 5


class Admission:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.waiting: collections.deque[Ticket] = collections.deque()
        self.num_running = 0

    @property
    def is_idle(self) -> bool:
        return self.num_running == 0 and not self.waiting

    def hold(self, ticket: Ticket) -> None:
        """Queue the ticket; QueueFull when running + held already fill
        max_concurrent_requests + max_queue (the ticket is then rejected)."""
        if self.num_running + len(self.waiting) >= self.spec.max_concurrent_requests + self.spec.max_queue:
            ticket.status = "rejected"
            raise QueueFull(
                f"model {self.spec.id!r} is at capacity ({self.spec.max_concurrent_requests} running, "
                f"{self.spec.max_queue} queued); retry later", retry_after=QUEUE_FULL_RETRY_AFTER_SECONDS)
        ticket.status = "waiting"
        self.waiting.append(ticket)

    def admit(self, worker: Worker | None) -> None:
        """Send held tickets to `worker`, in order, while fewer than max_concurrent_requests run."""
        while self.waiting and self.num_running < self.spec.max_concurrent_requests:
            ticket = self.waiting.popleft()
            ticket.status = "running"
            self.num_running += 1
            if not ticket.admitted.done():
                ticket.admitted.set_result(worker)

    def leave(self, ticket: Ticket) -> bool:
        """The ticket is done; True when it was the last one running and none is held."""
        was_running = ticket.status == "running"
        if ticket.status == "waiting":
            self.waiting.remove(ticket)
        elif was_running:
            self.num_running -= 1
        ticket.status = "done"
        if not ticket.admitted.done():
            ticket.admitted.cancel()
        return was_running and self.is_idle

    def fail_all(self, exc: Exception) -> None:
        """Every held ticket fails with `exc`; running ones are not touched."""
        while self.waiting:
            ticket = self.waiting.popleft()
            ticket.status = "failed"
            if not ticket.admitted.done():
                ticket.admitted.set_exception(exc)
