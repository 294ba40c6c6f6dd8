"""One worker process: launch on a free loopback port, wait until healthy, stop.

Mechanism only; the controller decides when. A worker runs in its own process group (so a
Ctrl-C in the gateway's terminal does not reach it, and `stop` reaches its children too) and
gets PR_SET_PDEATHSIG=SIGKILL, so it dies with the gateway even when the gateway is SIGKILLed.
Its stdout and stderr go to the gateway's stderr.

A worker is forked by the zygote when one is up (lifecycle/zygote.py: no torch import per
start), else spawned. A forked worker is not our child: the zygote reaps it and sends its exit
code; it dies with the zygote, which dies with us.

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
from dormant.lifecycle.zygote import ZygoteClient, ZygoteUnavailable

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
    """A launched worker (spawned, or forked by the zygote); `wait` returns its exit code."""

    def __init__(self, spec: ModelSpec, pid: int, port: int, host: str, exited: asyncio.Future,
                 forked: bool = False) -> None:
        self.spec = spec
        self.port = port
        self.base_url = f"http://{host}:{port}"
        self.forked = forked
        self._pid = pid
        self._exited = exited

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._exited.result() if self._exited.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    @classmethod
    async def launch(cls, spec: ModelSpec, env: dict[str, str] | None = None,
                     host: str = "127.0.0.1", zygote: "ZygoteClient | None" = None) -> "WorkerProcess":
        port = free_port(host)
        args = [
            "--source", spec.source, "--model-id", spec.id,
            "--host", host, "--port", str(port),
            "--engine", spec.engine, "--engine-args", json.dumps(spec.engine_args),
        ]
        full_env = {**os.environ, **(env or {})}
        if zygote is not None and zygote.is_ready:
            try:
                pid, exited = await zygote.fork(args, full_env)
                log.info("model %s: worker pid %d forked by the zygote on port %d", spec.id, pid, port)
                return cls(spec, pid, port, host, exited, forked=True)
            except ZygoteUnavailable as e:
                log.warning("model %s: %s; spawning the worker instead", spec.id, e)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dormant.worker", *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sys.stderr.fileno(),
            stderr=sys.stderr.fileno(),
            env=full_env,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        log.info("model %s: worker pid %d launched on port %d", spec.id, proc.pid, port)
        exited = asyncio.ensure_future(proc.wait())
        return cls(spec, proc.pid, port, host, exited)

    async def wait_healthy(self, client: httpx.AsyncClient, timeout: float) -> None:
        """Poll GET /health until 200; fail fast when the process exits or `timeout` passes."""
        deadline = time.monotonic() + timeout
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
            # A flat 20 ms: a refused connect on loopback costs microseconds, and a backoff
            # that grew to 0.5 s added up to half a second to every start (a restore from a
            # warm image is ~1 s in all). The child watcher sets returncode meanwhile.
            await asyncio.sleep(0.02)

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> int:
        """SIGTERM the process group, SIGKILL after `grace`; return the exit code."""
        if self.returncode is None:
            self._signal(signal.SIGTERM)
            try:
                return await asyncio.wait_for(self.wait(), timeout=grace)
            except asyncio.TimeoutError:
                log.warning("model %s: worker pid %d ignored SIGTERM; killing", self.spec.id, self.pid)
        self._signal(signal.SIGKILL)
        return await self.wait()

    def kill(self) -> None:
        """SIGKILL now, without waiting (last resort at interpreter exit)."""
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        if self.returncode is not None:  # a forked worker's pid may be reused once it is gone
            return
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass
