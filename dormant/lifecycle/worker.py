"""What the lifecycle needs of a worker: the `Worker` protocol, and the clock it times by.

The controller talks to a worker only through `Worker` (process.py's `WorkerProcess` is the
real one; the tests bring a fake), and reads time only through `Clock`, so a test can drive
idle timers and retry backoffs without sleeping.

Exceptions:
    RuntimeError
     └── WorkerStartFailed   the worker exited before it was healthy, or the start timed out
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Protocol

from dormant.worker_api import WorkerClient, WorkerStats

STOP_GRACE_SECONDS = 10.0


class WorkerStartFailed(RuntimeError):
    pass


class Worker(Protocol):
    """One launched worker process. Control calls raise on failure (worker_api's
    WorkerControlError, httpx.HTTPError); the controller treats any exception as a failure."""

    @property
    def pid(self) -> int: ...

    @property
    def port(self) -> int: ...

    @property
    def base_url(self) -> str: ...

    @property
    def client(self) -> WorkerClient:
        """The gateway sends requests through it."""

    @property
    def returncode(self) -> int | None:
        """The exit code once the process has exited, else None."""

    async def wait(self) -> int:
        """Return the exit code when the process exits (never cancels the exit itself)."""

    async def wait_healthy(self, timeout: float) -> None:
        """Return once /health answers 200; WorkerStartFailed if it exits or `timeout` passes."""

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> int:
        """SIGTERM, SIGKILL after `grace`; the exit code."""

    def kill(self) -> None:
        """SIGKILL now, without waiting: `wait` then returns (a stopped process ignores SIGTERM)."""

    async def is_healthy(self, timeout: float) -> bool:
        """GET /health answered 200 within `timeout` seconds (the watchdog's probe)."""

    async def sleep(self, level: int) -> None:
        """Weights off the accelerator, KV freed; the process stays."""

    async def wake_up(self) -> None: ...

    async def hibernate(self) -> str | None:
        """Make sure the engine image is on disk; its folder, or None when there is none."""

    async def stats(self) -> WorkerStats: ...


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def time(self) -> float:
        """Wall-clock seconds (what /running shows)."""

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> TimerHandle: ...


class LoopClock:
    """The real clock: time.monotonic, time.time and the running loop's timers."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> TimerHandle:
        return asyncio.get_running_loop().call_later(delay, fn, *args)
