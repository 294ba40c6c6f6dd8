"""The gateway's side of the zygote (dormant/worker/zygote.py): start it, ask it to fork.

    zygote = ZygoteClient(env, standby="auto")
    zygote.start()                    # in the background at gateway start; never blocks
    pid, exited = await zygote.fork(argv, env)  # ZygoteUnavailable while it is not up: spawn instead
    code = await exited               # the worker's exit code, as the zygote reaped it

The zygote runs with PR_SET_PDEATHSIG, so it dies with the gateway, and its forked workers
die with it. Never imports torch.
"""

from __future__ import annotations

import array
import asyncio
import json
import logging
import os
import socket
import sys
from pathlib import Path

from dormant._proc import set_pdeathsig
from dormant.store.paths import runtime_folder

log = logging.getLogger("dormant.lifecycle")

READY_TIMEOUT_SECONDS = 120.0
STARTING_WAIT_SECONDS = 30.0  # a fork waits this long for a zygote still importing


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
        self._task: asyncio.Task | None = None

    @property
    def is_ready(self) -> bool:
        return self._ready and self._proc is not None and self._proc.returncode is None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._start())

    async def _start(self) -> None:
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "dormant.worker.zygote", "--socket", str(self.socket_path), *self._standby,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=sys.stderr.fileno(),
                env={**os.environ, **self._env}, start_new_session=True,
                preexec_fn=set_pdeathsig if sys.platform.startswith("linux") else None,
            )
            line = await asyncio.wait_for(self._proc.stdout.readline(), READY_TIMEOUT_SECONDS)
            if line.strip() != b"zygote ready":
                raise ZygoteUnavailable(f"zygote said {line!r}")
            self._ready = True
            log.info("zygote pid %d ready: workers start without importing torch", self._proc.pid)
        except (OSError, asyncio.TimeoutError, ZygoteUnavailable) as e:
            log.warning("zygote did not start (%s); workers are spawned plainly", e)

    async def fork(self, argv: list[str], env: dict[str, str]) -> tuple[int, asyncio.Future]:
        """A new worker process running `python -m dormant.worker ARGV`: its pid, and a future
        of its exit code (-N: killed by signal N; -1 when the zygote went away first, which
        takes the worker with it)."""
        if self._task is not None and not self._task.done():
            # Still importing (the first request often comes right after the gateway starts):
            # waiting costs less than a plain spawn, which would import the same modules again
            # while competing with the zygote for the cores (measured on 2 cores: 7.7 s vs 5 s).
            try:
                await asyncio.wait_for(asyncio.shield(self._task), STARTING_WAIT_SECONDS)
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
