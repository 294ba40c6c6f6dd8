"""Process mechanics both sides of the worker contract use: the gateway (lifecycle/process.py,
lifecycle/zygote.py) and the worker (worker/__main__.py, worker/forking.py, worker/zygote.py).

No torch and nothing of the package here: the gateway and the worker may both import it.
"""

from __future__ import annotations

import ctypes
import signal
import socket
import sys

_PR_SET_PDEATHSIG = 1


def set_pdeathsig() -> None:
    """Die (SIGKILL) when the parent dies, even a SIGKILLed parent. In the process itself, or as
    a `preexec_fn` between fork and exec. Linux only; elsewhere the gateway's shutdown hook
    still stops its workers."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the worker binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# glibc's malloc asks for transparent huge pages on the memory it maps (glibc >= 2.35; THP in
# "madvise" mode, the common default). A worker maps its big buffers through malloc, and
# llama.cpp clears its whole KV cache at context creation: with 4 KiB pages that is one fault a
# page (377 MB, 92,000 faults: 0.20 s on the 2-core machine), with 2 MiB pages 0.05 s.
HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def worker_environ(env: dict[str, str]) -> dict[str, str]:
    """`env` for a process that runs engines: GLIBC_TUNABLES gains HUGE_PAGE_TUNABLE unless it
    sets glibc.malloc.hugetlb itself. Read by glibc when the process starts: a forked worker
    has its zygote's."""
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" in tunables:
        return dict(env)
    return {**env, "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGE_TUNABLE}" if tunables else HUGE_PAGE_TUNABLE}
