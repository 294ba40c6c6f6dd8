"""One worker process: launch on a free loopback port, wait until healthy, stop.

Mechanism only; the controller decides when. A worker runs in its own process group (so a
Ctrl-C in the gateway's terminal does not reach it, and `stop` reaches its children too) and
gets PR_SET_PDEATHSIG=SIGKILL, so it dies with the gateway even when the gateway is SIGKILLed.
Its stdout and stderr go to the gateway's stderr.

Exceptions:
    WorkerStartFailed   the process exited before /health answered, or the start timed out
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time

import httpx

from dormant.config import ModelSpec

log = logging.getLogger("dormant.lifecycle")

STOP_GRACE_SECONDS = 10.0
_PR_SET_PDEATHSIG = 1


class WorkerStartFailed(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """preexec_fn: runs in the child between fork and exec (Linux only)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the gateway's shutdown hook still stops workers


class WorkerProcess:
    """A launched worker. `exited` resolves with the exit code when the process ends."""

    def __init__(self, spec: ModelSpec, proc: asyncio.subprocess.Process, port: int, host: str) -> None:
        self.spec = spec
        self.port = port
        self.base_url = f"http://{host}:{port}"
        self._proc = proc

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        return await self._proc.wait()

    @classmethod
    async def launch(cls, spec: ModelSpec, env: dict[str, str] | None = None,
                     host: str = "127.0.0.1") -> "WorkerProcess":
        port = free_port(host)
        argv = [
            sys.executable, "-m", "dormant.worker",
            "--source", spec.source, "--model-id", spec.id,
            "--host", host, "--port", str(port),
            "--engine", spec.engine, "--engine-args", json.dumps(spec.engine_args),
        ]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sys.stderr.fileno(),
            stderr=sys.stderr.fileno(),
            env={**os.environ, **(env or {})},
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        log.info("model %s: worker pid %d launched on port %d", spec.id, proc.pid, port)
        return cls(spec, proc, port, host)

    async def wait_healthy(self, client: httpx.AsyncClient, timeout: float) -> None:
        """Poll GET /health until 200; fail fast when the process exits or `timeout` passes."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            if self.returncode is not None:
                raise WorkerStartFailed(f"worker exited with code {self.returncode} while starting")
            try:
                r = await client.get(f"{self.base_url}/health", timeout=2.0)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() >= deadline:
                raise WorkerStartFailed(f"worker not healthy after {timeout:.0f} s (start timeout)")
            await asyncio.sleep(delay)  # the child watcher sets returncode meanwhile
            delay = min(delay * 1.5, 0.5)

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> int:
        """SIGTERM the process group, SIGKILL after `grace`; return the exit code."""
        if self.returncode is None:
            self._signal(signal.SIGTERM)
            try:
                return await asyncio.wait_for(self._proc.wait(), timeout=grace)
            except asyncio.TimeoutError:
                log.warning("model %s: worker pid %d ignored SIGTERM; killing", self.spec.id, self.pid)
        self._signal(signal.SIGKILL)
        return await self._proc.wait()

    def kill(self) -> None:
        """SIGKILL now, without waiting (last resort at interpreter exit)."""
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass
