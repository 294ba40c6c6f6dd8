"""The zygote: a template worker that forks workers, so no start pays the import again.

    python -m dormant.worker.zygote --socket PATH [--standby auto|always|off] [--standby-delay S]
                                    [--standby-sources JSON]

It imports torch, transformers, the native engine and the worker's server (worker/preload.py:
3-5 s on the GPU machine, DESIGN.md section 4e), never touches CUDA (a forked CUDA context is unusable), then
serves one request per connection on a unix socket (mode 0600):

    -> {"argv": [...worker args...], "env": {...}}  plus one fd (SCM_RIGHTS): the child's stdout/stderr
    <- {"pid": PID}                                  or {"error": "..."}, then, later, on the
    <- {"exit": CODE}                                same connection: the child's exit status as
                                                     subprocess reports it (-N: killed by signal N)

The child starts a new session (its own process group, so the gateway can signal the group),
sets PR_SET_PDEATHSIG=SIGKILL (its parent is the zygote, which has the same tie to the
gateway: a SIGKILLed gateway takes both down), takes the fd as stdout and stderr, replaces its
environment and runs `dormant.worker.__main__.main(argv)`. The zygote reaps its children
(SIGCHLD wakes its select loop through a pipe) and tells the gateway how each one ended.

With --standby, a request may instead go to a worker forked ahead that has made its CUDA
context already (worker/standby.py); the reply and the exit message are the same.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import select
import signal
import socket
import sys
import threading
import time

from dormant._proc import set_pdeathsig
from dormant.worker import standby
from dormant.worker.forking import close_inherited, exit_with, recv_request, run_worker, start_session

STANDBY_DELAY_S = 2.0  # a claimed standby's replacement waits this long: off that worker's start
MAX_STANDBY_FAILURES = 3  # standbys that died unclaimed in a row before the zygote stops trying


def _child(request: dict, out_fd: int | None, inherited: list) -> None:
    """In the forked child: never returns. `inherited`: the zygote's sockets and its wake-up
    pipe, which the worker must not keep."""

    def run() -> int:
        close_inherited(inherited)
        start_session()
        return run_worker(request, out_fd)

    exit_with(run)


class Zygote:
    """The serving loop: one fork request per connection; children reaped; the standby kept."""

    def __init__(self, path: str, standby_mode: str = "off", standby_delay: float = STANDBY_DELAY_S,
                 standby_sources: list[str] | None = None) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self.listener.bind(path)
        finally:
            os.umask(old_umask)
        self.listener.listen(16)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w)  # a SIGCHLD writes here: select() returns and we reap
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.children: dict[int, socket.socket] = {}  # pid -> the connection that asked for it
        self.standby_mode = standby_mode if standby.wanted(standby_mode) else "off"
        self.standby_delay = standby_delay
        self.standby_sources = list(standby_sources or [])
        self.standby = None
        self.standby_due: float | None = time.monotonic() if self.standby_mode != "off" else None
        self.standby_failures = 0
        self.own_env = dict(os.environ)

    def _inherited(self) -> list:
        held = [self.listener, *self.children.values(), self.wake_r, self.wake_w]
        return held + ([self.standby.sock] if self.standby is not None else [])

    def serve(self) -> None:
        print("zygote ready", flush=True)
        while True:
            if self.standby_due is not None and time.monotonic() >= self.standby_due:
                self._fork_standby()  # before a request that may be waiting for it
            timeout = None if self.standby_due is None else max(0.0, self.standby_due - time.monotonic())
            readable, _, _ = select.select([self.listener, self.wake_r], [], [], timeout)  # EINTR: retried (PEP 475)
            if self.wake_r in readable:
                while True:
                    try:
                        if not os.read(self.wake_r, 4096):
                            break
                    except BlockingIOError:
                        break
                self._reap()
            if self.listener in readable:
                self._accept()

    def _fork_standby(self) -> None:
        self.standby_due = None
        if threading.active_count() > 1:
            return
        self.standby = standby.Standby.fork(self._inherited(), self.standby_sources)

    def _reap(self) -> None:
        """waitpid every child that has ended; tell its connection the exit code."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.standby is not None and pid == self.standby.pid:  # died unclaimed
                self.standby.close()
                self.standby = None
                self.standby_failures += 1
                if self.standby_failures <= MAX_STANDBY_FAILURES:
                    self.standby_due = time.monotonic() + self.standby_delay * 2 ** self.standby_failures
                continue
            conn = self.children.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(json.dumps({"exit": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
                except OSError:
                    pass  # the gateway is gone
                conn.close()

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        out_fd = None
        keep = False
        try:
            request, out_fd = recv_request(conn)
            if "argv" not in request:
                raise ValueError("a request needs argv")
            ahead, pid = self.standby, None
            if ahead is not None and standby.fits(request, self.standby_mode, self.own_env):
                self.standby = None
                if ahead.hand_over(request, out_fd):
                    pid = ahead.pid
                    self.standby_failures = 0
                self.standby_due = time.monotonic() + self.standby_delay  # off the claimed start
            if pid is None:
                if threading.active_count() > 1:  # forking a threaded process can deadlock the child
                    raise RuntimeError("the zygote has threads; refusing to fork")
                pid = os.fork()
                if pid == 0:
                    _child(request, out_fd, [conn, *self._inherited()])
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            self.children[pid] = conn
            keep = True
        except Exception as e:  # noqa: BLE001 - the client falls back to a plain spawn
            try:
                conn.sendall(json.dumps({"error": f"{type(e).__name__}: {e}"}).encode() + b"\n")
            except OSError:
                pass
        finally:
            if out_fd is not None:
                os.close(out_fd)
            if not keep:
                conn.close()


def main(argv: list[str] | None = None) -> int:
    set_pdeathsig()  # dies with the gateway; the workers it forked die with it
    parser = argparse.ArgumentParser(prog="python -m dormant.worker.zygote")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--standby", choices=("auto", "always", "off"), default="off",
                        help="keep a worker forked ahead with its CUDA context (worker/standby.py)")
    parser.add_argument("--standby-delay", type=float, default=STANDBY_DELAY_S,
                        help="seconds between a standby's claim and its replacement")
    parser.add_argument("--standby-sources", default="[]",
                        help="JSON list of model sources whose tokenizers a standby preloads")
    args = parser.parse_args(argv)
    sources = json.loads(args.standby_sources)
    from dormant.worker.preload import preload

    preload()
    # the imports are for life: frozen, the collector never walks them again (in the zygote or
    # in a forked worker), and a collection no longer writes to their pages, shared with workers
    gc.collect()
    gc.freeze()
    Zygote(args.socket, args.standby, args.standby_delay, sources).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
