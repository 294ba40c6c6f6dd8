"""One worker process: launch on a free loopback port, wait until healthy, control, stop.

Mechanism only; the controller decides when. A worker runs in its own process group (so a
Ctrl-C in the gateway's terminal does not reach it, and `stop` reaches its children too) and
gets PR_SET_PDEATHSIG=SIGKILL, so it dies with the gateway even when the gateway is SIGKILLed.
Its stdout and stderr go to the gateway's stderr.

A worker is forked by the zygote when one is up (lifecycle/zygote.py: no torch import per
start), else spawned. A forked worker is not our child: the zygote reaps it and sends its exit
code; it dies with the zygote, which dies with us. Either way its command line is
worker_api.LaunchSpec's, and every call to it goes through its worker_api.WorkerClient. Each
launch makes the worker a new secret (worker_api.TOKEN_ENV) and hands it over in the worker's
environment (the zygote passes the environment on to the worker it forks); its client sends it.

Exceptions:
    WorkerStartFailed          the process exited before /health answered, or the start timed out
    worker_api.WorkerControlError   a control route (sleep, wake_up, hibernate, stats) failed
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time

import httpx

from dormant._proc import free_port, set_pdeathsig, worker_environ
from dormant.config import ModelSpec
from dormant.engines.base import get_engine
from dormant.lifecycle.worker import STOP_GRACE_SECONDS, WorkerStartFailed
from dormant.lifecycle.zygote import ZygoteClient, ZygoteUnavailable
from dormant.worker_api import REQUEST_READ_TIMEOUT_SECONDS, TOKEN_ENV, LaunchSpec, WorkerClient, WorkerStats, new_token

log = logging.getLogger("dormant.lifecycle")


class WorkerProcess:
    """A launched worker (spawned, or forked by the zygote); `wait` returns its exit code."""

    def __init__(self, spec: ModelSpec, launch: LaunchSpec, pid: int, exited: asyncio.Future,
                 http: httpx.AsyncClient, token: str, forked: bool = False,
                 read_timeout: float | None = REQUEST_READ_TIMEOUT_SECONDS) -> None:
        self.spec = spec
        self.launch_spec = launch
        self.port = launch.port
        self.base_url = launch.base_url
        self.client = WorkerClient(http, launch.base_url, token, read_timeout)
        self.forked = forked
        self._pid = pid
        self._exited = exited
        exited.add_done_callback(lambda _: self.client.close_idle())  # the worker closed its ends

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._exited.result() if self._exited.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    @classmethod
    async def launch(cls, spec: ModelSpec, http: httpx.AsyncClient, env: dict[str, str] | None = None,
                     host: str = "127.0.0.1", zygote: ZygoteClient | None = None,
                     read_timeout: float | None = REQUEST_READ_TIMEOUT_SECONDS) -> "WorkerProcess":
        """Start a worker for `spec`; `http` is the gateway's shared client (one pool);
        `read_timeout` the most seconds a request waits for a byte from it (None: no bound)."""
        launch = LaunchSpec(source=spec.source, model_id=spec.id, port=free_port(host), host=host,
                            engine=spec.engine, engine_args=dict(spec.engine_args),
                            tool_call_parser=spec.tool_call_parser, reasoning_parser=spec.reasoning_parser,
                            engine_command=spec.vllm_command)
        argv = launch.to_argv()
        # the operator's own secret where set (to reach workers yourself: benchmarks, debugging),
        # else a fresh one per launch
        token = os.environ.get(TOKEN_ENV) or new_token()
        full_env = {**os.environ, **(env or {}), TOKEN_ENV: token}
        # a worker that runs its engine's own server (vllm) imports no torch: spawned, not forked
        if zygote is not None and zygote.is_ready and get_engine(spec.engine).server_command is None:
            try:
                pid, exited = await zygote.fork(argv, full_env)
                log.info("model %s: worker pid %d forked by the zygote on port %d", spec.id, pid, launch.port)
                return cls(spec, launch, pid, exited, http, token, forked=True, read_timeout=read_timeout)
            except ZygoteUnavailable as e:
                log.warning("model %s: %s; spawning the worker instead", spec.id, e)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dormant.worker", *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sys.stderr.fileno(),
            stderr=sys.stderr.fileno(),
            env=worker_environ(full_env),
            start_new_session=True,
            preexec_fn=set_pdeathsig if sys.platform.startswith("linux") else None,
        )
        log.info("model %s: worker pid %d launched on port %d", spec.id, proc.pid, launch.port)
        return cls(spec, launch, proc.pid, asyncio.ensure_future(proc.wait()), http, token,
                   read_timeout=read_timeout)

    async def wait_healthy(self, timeout: float) -> None:
        """Poll GET /health until 200; fail fast when the process exits or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            if self.returncode is not None:
                raise WorkerStartFailed(f"worker exited with code {self.returncode} while starting")
            if await self.client.is_healthy():
                return
            if time.monotonic() >= deadline:
                raise WorkerStartFailed(f"worker not healthy after {timeout:.0f} s (start timeout)")
            # A flat 20 ms: a refused connect on loopback costs microseconds, and a backoff
            # that grew to 0.5 s added up to half a second to every start (a restore from a
            # warm image is ~1 s in all). The child watcher sets returncode meanwhile.
            await asyncio.sleep(0.02)

    # -- control: the worker_api calls, on this worker --

    async def is_healthy(self, timeout: float) -> bool:
        return await self.client.is_healthy(timeout)

    async def sleep(self, level: int = 1) -> None:
        await self.client.sleep(level)

    async def wake_up(self) -> None:
        await self.client.wake_up()

    async def hibernate(self) -> str | None:
        """The worker makes sure its engine image is on disk; its folder (None: the engine has none)."""
        return await self.client.hibernate()

    async def stats(self) -> WorkerStats:
        return await self.client.stats()

    # -- stopping --

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
