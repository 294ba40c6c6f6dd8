"""The zygote's standby worker: forked ahead, its CUDA context made, waiting for its model.

A worker forked at a request still pays for its CUDA context (cuInit and the primary context,
0.3 s), the restore's pinned staging and cuBLAS's first use before its model can run: a third
of a warm restore's critical path (bench/README.md, "Restore: the standby worker"). The zygote itself cannot make
them (a forked CUDA context is unusable), so it keeps one child that has:

    zygote ── fork ──> standby: setsid, PR_SET_PDEATHSIG, the engine's prepare (CUDA context,
                       staging, cuBLAS), the tokenizers of the models it may serve (a thread), then
                       blocks on its socket
    request ─────────> the zygote sends it {"argv", "env"} plus the output fd (the same message
                       the zygote got); the standby runs the worker's main(argv) with them
    zygote <────────── reaps it like any child it forked; a replacement is forked `delay` s later,
                       off the claimed worker's start

It holds one CUDA context (~0.5 GiB of GPU memory) and 256 MiB of pinned host memory while it
waits: the price of a faster restore (config `standby_worker`, on by default where a GPU may
be). A request takes it only when nothing it was made with would differ: the engine it
prepared (`ENGINE`), on a device that may be a GPU (the engine's `may_use_gpu`), and the same
CUDA_*, PYTORCH_*, TORCH_* and CUBLAS* variables (the context and torch's allocator have read
them already). Mode "always" also takes CPU requests (tests).
A standby whose context fails (no GPU after all, a GPU in exclusive-process mode held by a
worker) exits instead of being handed out; the zygote forks the next one after a growing delay,
and stops after three in a row.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

from dormant.engines.base import get_engine
from dormant.worker.forking import close_inherited, exit_with, recv_request, run_worker, start_session
from dormant.worker_api import LaunchSpec

ENGINE = "native"  # the engine whose context a standby prepares: the default one (LaunchSpec)
ENV_PREFIXES = ("CUDA_", "PYTORCH_", "TORCH_", "CUBLAS", "NVIDIA_")
MODES = ("auto", "always", "off")


def wanted(mode: str) -> bool:
    """Whether the zygote keeps a standby: "auto" where a GPU may be (a CUDA build of torch and
    the NVIDIA driver's device node; no cuInit here: the zygote must never touch CUDA)."""
    if mode == "always":
        return True
    if mode != "auto":
        return False
    import torch

    return torch.version.cuda is not None and os.path.exists("/dev/nvidiactl")


def fits(request: dict, mode: str, own_env: dict[str, str]) -> bool:
    """Whether a fork request may take the standby (see the module docstring)."""
    try:
        spec = LaunchSpec.from_argv(list(request.get("argv") or []))
        engine = get_engine(spec.engine)
    except ValueError:  # a bad argv, or UnknownEngine: the worker itself says so
        return False
    if spec.engine != ENGINE or (mode != "always" and not engine.may_use_gpu(spec.engine_args)):
        return False
    env = request.get("env") or {}
    keys = {k for k in (*env, *own_env) if k.startswith(ENV_PREFIXES)}
    return all(env.get(k) == own_env.get(k) for k in keys)


class Standby:
    """The zygote's handle on its standby: pid and the socket that hands it a request."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock

    @classmethod
    def fork(cls, inherited: list, sources: list[str] | None = None) -> "Standby":
        """Fork a standby. `inherited`: the zygote's sockets and pipe fds, closed in the child;
        `sources`: the models whose tokenizers it preloads while it waits."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            ours.close()
            _run(theirs, inherited, sources or [])  # never returns
        theirs.close()
        return cls(pid, ours)

    def hand_over(self, request: dict, out_fd: int | None) -> bool:
        """Send the request (and the output fd) to the standby; False if it is gone."""
        import array

        line = json.dumps({"argv": request["argv"], "env": request.get("env") or {}}).encode() + b"\n"
        fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [out_fd]))] if out_fd is not None else []
        try:
            self.sock.sendmsg([line], fds)
            return True
        except OSError:
            return False
        finally:
            self.sock.close()

    def close(self) -> None:
        self.sock.close()


def _run(conn: socket.socket, inherited: list, sources: list[str]) -> None:
    """In the standby: prepare, preload, wait for a request, run the worker. Never returns."""
    forked = time.time()

    def run() -> int:
        close_inherited(inherited)
        start_session()
        engine = get_engine(ENGINE)
        engine.prepare({})  # the CUDA context, pinned staging, cuBLAS, in the background
        error = engine.context_error()
        if error is not None:  # never handed out: the zygote forks a new one later, or stops trying
            print(f"dormant standby pid {os.getpid()}: no CUDA context ({error}); exiting", file=sys.stderr, flush=True)
            return 1
        if sources:
            engine.preload_tokenizers(sources)  # idle time now; the claimed worker takes its model's
        request, out_fd = recv_request(conn)  # blocks until claimed
        conn.close()
        if not request:  # the zygote went away first
            return 0
        claimed = time.time()
        return run_worker(request, out_fd, started_at=claimed,
                          note=f"dormant standby pid {os.getpid()}: claimed {claimed - forked:.1f} s after it was forked")

    exit_with(run)
