"""What a process forked by the zygote does first, whether it is a worker forked at a request
(worker/zygote.py) or the standby forked ahead (worker/standby.py): read its request, leave
the zygote's fds and session behind, run the worker's main, and exit without returning.

    -> {"argv": [...worker args...], "env": {...}}  plus one fd (SCM_RIGHTS): its stdout/stderr
"""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import sys

from dormant._proc import set_pdeathsig

MAX_MESSAGE = 1 << 20


def recv_request(conn: socket.socket) -> tuple[dict, int | None]:
    """One request line and the fd sent with it; ({}, None) if the peer closed first."""
    fds = array.array("i")
    data = b""
    while True:
        chunk, ancdata, _flags, _addr = conn.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        data += chunk
        if not chunk or data.endswith(b"\n"):
            break
    return (json.loads(data) if data.strip() else {}), (fds[0] if fds else None)


def close_inherited(inherited: list) -> None:
    """In a forked child: drop the zygote's sockets, pipe fds and signal wake-up fd."""
    signal.set_wakeup_fd(-1)
    for held in inherited:
        if isinstance(held, int):
            os.close(held)
        else:
            held.close()


def start_session() -> None:
    """In a forked child: its own session (the gateway signals the group), default signal
    dispositions, stdin from /dev/null, and death with its parent."""
    os.setsid()
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    set_pdeathsig()


def run_worker(request: dict, out_fd: int | None, started_at: float | None = None, note: str | None = None) -> int:
    """In a forked child: take the request's output fd (stdout and stderr) and environment,
    print `note` there, then run the worker's main; its exit code."""
    if out_fd is not None:
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.close(out_fd)
    if note:
        print(note, file=sys.stderr, flush=True)
    os.environ.clear()
    os.environ.update(request.get("env") or {})
    from dormant.worker.__main__ import main

    return main(list(request["argv"]), started_at=started_at)


def exit_with(run) -> None:
    """In a forked child: exit with run()'s code (a SystemExit's; 1 after an exception, printed),
    never returning into the zygote loop."""
    code = 1
    try:
        code = run()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - report and exit
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
