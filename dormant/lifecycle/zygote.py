"""The gateway's side of the zygote (dormant/worker/zygote.py): start it, ask it to fork.

    zygote = ZygoteClient(env, standby="auto")
    zygote.start()                    # in the background at gateway start; never blocks
    pid, exited = await zygote.fork(argv, env)  # ZygoteUnavailable while it is not up: spawn instead
    code = await exited               # the worker's exit code, as the zygote reaped it

The zygote runs with PR_SET_PDEATHSIG, so it dies with the gateway, and its forked workers
die with it. It is supervised: when it dies (its workers die with it), that is logged and a
new one is started at once, then after 1, 2, 4... 60 s while new ones keep dying young; starts
meanwhile are spawned plainly (issue 15, item 8: without this every later start imported torch
again, 4.9 s instead of 1.05 s). Never imports torch.
"""

from __future__ import annotations

import array
import asyncio
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from dormant._proc import set_pdeathsig, worker_environ
from dormant.store.paths import runtime_folder

log = logging.getLogger("dormant.lifecycle")

READY_TIMEOUT_SECONDS = 120.0
STARTING_WAIT_SECONDS = 30.0  # a fork waits this long for a zygote still importing
# a zygote that served this long before it died resets the restart backoff
HEALTHY_RUN_SECONDS = 60.0
MAX_RESTART_BACKOFF_SECONDS = 60.0


class ZygoteUnavailable(RuntimeError):
    pass


class ZygoteClient:
    def __init__(self, env: dict[str, str] | None = None, standby: str = "off",
                 standby_delay: float | None = None, standby_sources: list[str] | None = None) -> None:
        """`standby`: "auto" keeps a worker forked ahead with its CUDA context where a GPU
        may be, "always" also on the CPU (tests), "off" never (worker/standby.py); it preloads
        the tokenizers of `standby_sources`."""
        self._env = env or {}
        self._standby = ["--standby", standby, "--standby-sources", json.dumps(list(standby_sources or []))]
        if standby_delay is not None:
            self._standby += ["--standby-delay", str(standby_delay)]
        # 0700, under the store: a SIGKILL leaves nothing in /tmp, and the next start cleans it
        store = Path(self._env["DORMANT_HOME"]) if self._env.get("DORMANT_HOME") else None
        self._folder = runtime_folder("zygote", store, longest_name="zygote.sock")
        self.socket_path = self._folder / "zygote.sock"
        self._proc: asyncio.subprocess.Process | None = None
        self._ready = False
        self._task: asyncio.Task | None = None  # the supervisor: for the gateway's life
        self._starting: asyncio.Future | None = None  # done once the current start is up or failed

    @property
    def is_ready(self) -> bool:
        return self._ready and self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    def start(self) -> None:
        self._starting = asyncio.get_running_loop().create_future()
        self._task = asyncio.ensure_future(self._supervise())

    async def _supervise(self) -> None:
        """Start the zygote; each time it dies, log it and start another, backing off while
        they keep dying young (or failing to come up)."""
        failures = 0
        while True:
            if self._starting is None or self._starting.done():
                self._starting = asyncio.get_running_loop().create_future()
            try:
                up = await self._start()
            finally:
                self._starting.set_result(None)
            began = time.monotonic()
            if up:
                code = await self._proc.wait()
                self._ready = False
                log.warning("zygote pid %d exited (code %s), taking its workers with it; starting a new one",
                            self._proc.pid, code)
            served_long = up and time.monotonic() - began >= HEALTHY_RUN_SECONDS
            failures = 0 if served_long else failures + 1
            delay = 0.0 if failures <= 1 else min(2.0 ** (failures - 2), MAX_RESTART_BACKOFF_SECONDS)
            if delay:
                log.warning("zygote: restart %d in a row; the next in %.0f s (workers are spawned plainly "
                            "meanwhile)", failures, delay)
                await asyncio.sleep(delay)

    async def _start(self) -> bool:
        """One zygote up to its "zygote ready" line; False (logged) when it would not come up."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()  # a start that timed out: that one is not waited for twice
            await self._proc.wait()
        self.socket_path.unlink(missing_ok=True)  # a dead zygote's socket: the next one binds anew
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "dormant.worker.zygote", "--socket", str(self.socket_path), *self._standby,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=sys.stderr.fileno(),
                env=worker_environ({**os.environ, **self._env}), start_new_session=True,
                preexec_fn=set_pdeathsig if sys.platform.startswith("linux") else None,
            )
            line = await asyncio.wait_for(self._proc.stdout.readline(), READY_TIMEOUT_SECONDS)
            if line.strip() != b"zygote ready":
                raise ZygoteUnavailable(f"zygote said {line!r}")
            self._ready = True
            log.info("zygote pid %d ready: workers start without importing torch", self._proc.pid)
            return True
        except (OSError, asyncio.TimeoutError, ZygoteUnavailable) as e:
            log.warning("zygote did not start (%s); workers are spawned plainly", e)
            if self._proc is not None and self._proc.returncode is None:
                self._proc.kill()  # reaped by the next start, or by stop
            return False

    async def fork(self, argv: list[str], env: dict[str, str]) -> tuple[int, asyncio.Future]:
        """A new worker process running `python -m dormant.worker ARGV`: its pid, and a future
        of its exit code (-N: killed by signal N; -1 when the zygote went away first, which
        takes the worker with it)."""
        if self._starting is not None and not self._starting.done():
            # Still importing (the first request often comes right after the gateway starts):
            # waiting costs less than a plain spawn, which would import the same modules again
            # while competing with the zygote for the cores (measured on 2 cores: 7.7 s vs 5 s).
            try:
                await asyncio.wait_for(asyncio.shield(self._starting), STARTING_WAIT_SECONDS)
            except asyncio.TimeoutError:
                pass
        if not self.is_ready:
            raise ZygoteUnavailable("the zygote is not up")
        pid, conn, rest = await asyncio.to_thread(self._fork_blocking, argv, env)
        return pid, asyncio.ensure_future(_exit_code(conn, rest))

    def _fork_blocking(self, argv: list[str], env: dict[str, str]) -> tuple[int, socket.socket, bytes]:
        """(pid, the connection, which stays open for the exit message, bytes read past the reply)."""
        request = json.dumps({"argv": argv, "env": env}).encode() + b"\n"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(30)
            s.connect(str(self.socket_path))
            s.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                   array.array("i", [sys.stderr.fileno()]))])
            reply = b""
            while b"\n" not in reply:
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
        except OSError as e:
            s.close()
            raise ZygoteUnavailable(f"zygote: {e}") from e
        line, _, rest = reply.partition(b"\n")
        answer = json.loads(line or b"{}")
        if "pid" not in answer:
            s.close()
            raise ZygoteUnavailable(f"zygote refused: {answer.get('error', 'no answer')}")
        return int(answer["pid"]), s, rest

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        self.socket_path.unlink(missing_ok=True)
        try:
            self._folder.rmdir()
        except OSError:
            pass


async def _exit_code(conn: socket.socket, buffered: bytes) -> int:
    """The {"exit": CODE} line the zygote sends on `conn` when it reaps the worker; -1 if the
    connection ends first (the zygote died, and its workers with it)."""
    conn.setblocking(False)
    try:
        reader, writer = await asyncio.open_unix_connection(sock=conn)
    except OSError:
        conn.close()
        return -1
    try:
        line = buffered if buffered.endswith(b"\n") else buffered + await reader.readline()
        return int(json.loads(line)["exit"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1
    finally:
        writer.close()
