"""The suspended tier's mechanism: the CUDA driver's checkpoint API, by process id (DESIGN.md
section 4g). `cuCheckpointProcessLock` stops a process's CUDA calls and waits for its work,
`…Checkpoint` moves all its GPU state, the CUDA context included, into its own host memory and
releases the GPU, `…Restore` puts it back at the same device addresses, `…Unlock` lets it run on.
The process never notices: its compiled kernels, CUDA graphs and allocator stay valid.

Who calls it: the lifecycle, in the gateway process, for every engine. The API takes any pid
(NVIDIA's own sample checkpoints its own process), so the worker could call it on itself; it
is called from outside because (1) one call then serves every engine, whatever runs the CUDA
work: the native worker is its CUDA process, vLLM's are its children (API server and engine
core), and no engine needs a route or code for it; (2) the lifecycle owns the tiers: it decides,
acts and records the outcome with no round trip through a worker whose CUDA calls are blocked
meanwhile (any of its routes that touched CUDA would hang until the resume). The gateway imports
no torch for it: cuda-bindings only, imported at the first suspension (it raises at import on
a machine without a driver), and a cuInit, which makes no CUDA context.

Which processes: the worker and its descendants that have a GPU device file open (/proc/PID/fd,
what `fuser /dev/nvidia*` reads: pid namespaces do not matter, unlike NVML's pids) and that the
driver knows as CUDA processes (cuCheckpointProcessGetState answers). All are locked, then all
checkpointed; resume restores all, then unlocks all. Within each of those four steps the
processes go at once, one thread each (cuda-bindings releases the GIL inside driver calls): vLLM's
two processes resumed one after the other took 1.70 s on the H200, most of it per process, not
per byte (1.71 GiB moved). The steps themselves stay in order: no process is checkpointed before
every one is locked, none unlocked before every one is restored.

Exceptions:
    RuntimeError
     ├── SuspendUnavailable   the API cannot suspend this worker (no cuda-bindings, no driver,
     │                        a driver older than 570, no CUDA process, or the driver refused and
     │                        the processes were put back as they were): the tier is skipped
     └── SuspendFailed        the driver failed part-way and the processes could not be put
                              back: the worker is in an unknown state and must be stopped
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

log = logging.getLogger("dormant.lifecycle")

# cuCheckpointProcess* are in the driver from CUDA 12.8 (driver 570) on
MIN_DRIVER_VERSION = 12080
# an asleep worker has no work in flight: a lock that takes this long means something runs
LOCK_TIMEOUT_MS = 30_000


class SuspendUnavailable(RuntimeError):
    pass


class SuspendFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class Suspension:
    """A suspended worker: its checkpointed processes and what the checkpoint cost."""

    pids: tuple[int, ...]
    host_bytes: int  # host memory its processes grew by (their GPU state, now in RAM)
    seconds: float


class Suspender(Protocol):
    """How the lifecycle suspends a worker; CudaCheckpoint is the real one."""

    async def suspend(self, pid: int) -> Suspension:
        """Checkpoint the CUDA processes of the worker `pid` (and its descendants)."""

    async def resume(self, suspension: Suspension) -> float:
        """Restore and unlock them; the seconds it took."""


class CudaCheckpoint:
    """The driver's checkpoint API through cuda-bindings. Calls block for seconds (a 16 GB
    process), so each runs on a thread; one suspension or resume at a time per gateway.
    parallel=False calls the driver for one process after the other (the measurement's baseline:
    bench_suspend.py, tests/gpu/test_suspend_gpu.py)."""

    def __init__(self, parallel: bool = True) -> None:
        self._parallel = parallel
        self._driver: Any = None
        self._unavailable: str | None = None
        self._lock = threading.Lock()

    async def suspend(self, pid: int) -> Suspension:
        return await asyncio.to_thread(self._suspend, pid)

    async def resume(self, suspension: Suspension) -> float:
        return await asyncio.to_thread(self._resume, suspension)

    # ---- on a thread ----------------------------------------------------------------------------

    def _suspend(self, root: int) -> Suspension:
        with self._lock:
            cu = self._load()
            pids, answers = self._cuda_pids(cu, root)
            if not pids:
                why = "; ".join(answers) or "no process of the worker has a GPU device open"
                raise SuspendUnavailable(f"no CUDA process to checkpoint ({why})")
            rss_before = _rss(pids)
            started = time.monotonic()
            locked, refused = self._each(cu, "cuCheckpointProcessLock", pids, self._lock_args(cu))
            was_locked = time.monotonic()
            checkpointed: list[int] = []
            if refused is None:
                checkpointed, refused = self._each(cu, "cuCheckpointProcessCheckpoint", pids)
            if refused is not None:
                self._put_back(cu, locked, checkpointed, refused)
                raise refused
            seconds = time.monotonic() - started
            log.info("suspended pids %s: lock %.3f s, checkpoint %.3f s", pids, was_locked - started,
                     seconds - (was_locked - started))
            moved = max(0, _rss(pids) - rss_before)
            return Suspension(tuple(pids), moved, seconds)

    def _resume(self, suspension: Suspension) -> float:
        with self._lock:
            cu = self._load()
            started = time.monotonic()
            pids = list(suspension.pids)
            _, refused = self._each(cu, "cuCheckpointProcessRestore", pids)
            restored = time.monotonic()
            if refused is None:
                _, refused = self._each(cu, "cuCheckpointProcessUnlock", pids)
            if refused is not None:
                raise SuspendFailed(f"resume failed: {refused}")
            done = time.monotonic()
            log.info("resumed pids %s: restore %.3f s, unlock %.3f s", pids, restored - started, done - restored)
            return done - started

    def _put_back(self, cu: Any, locked: list[int], checkpointed: list[int], refused: Exception) -> None:
        """Undo a suspension the driver refused part-way: restore what was checkpointed, unlock
        what was locked. SuspendFailed when that fails too."""
        _, failed = self._each(cu, "cuCheckpointProcessRestore", checkpointed)
        if failed is None:
            _, failed = self._each(cu, "cuCheckpointProcessUnlock", locked)
        if failed is not None:
            raise SuspendFailed(f"{refused}; then putting the processes back failed: {failed}")

    def _each(self, cu: Any, name: str, pids: list[int],
              args: Any = None) -> tuple[list[int], SuspendUnavailable | None]:
        """`name`(pid, args) for every pid at once, one thread each; waits for all of them. The
        pids it succeeded for (in `pids`' order) and the first refusal, or None."""
        if len(pids) <= 1 or not self._parallel:
            outcomes = [self._try(cu, name, p, args) for p in pids]
        else:
            with ThreadPoolExecutor(max_workers=len(pids), thread_name_prefix="cuda-checkpoint") as pool:
                outcomes = list(pool.map(lambda p: self._try(cu, name, p, args), pids))
        done = [p for p, refused in zip(pids, outcomes) if refused is None]
        return done, next((refused for refused in outcomes if refused is not None), None)

    def _try(self, cu: Any, name: str, pid: int, args: Any) -> SuspendUnavailable | None:
        try:
            self._call(cu, name, pid, args)
        except SuspendUnavailable as refused:
            return refused
        return None

    @staticmethod
    def _lock_args(cu: Any) -> Any:
        args = cu.CUcheckpointLockArgs()
        args.timeoutMs = LOCK_TIMEOUT_MS
        return args

    def _load(self) -> Any:
        """cuda-bindings' driver module, initialized; SuspendUnavailable (remembered) when the
        API is not there."""
        if self._driver is not None:
            return self._driver
        if self._unavailable is None:
            self._unavailable = self._why_unavailable()
        if self._unavailable is not None:
            raise SuspendUnavailable(self._unavailable)
        return self._driver

    def _why_unavailable(self) -> str | None:
        try:
            from cuda.bindings import driver as cu
        except ImportError:
            return "cuda-bindings is not installed (pip install cuda-bindings)"
        except Exception as e:  # it raises at import where there is no NVIDIA driver
            return f"the CUDA driver cannot be loaded ({e})"
        try:
            self._check(cu, cu.cuInit(0), "cuInit")
            version = self._check(cu, cu.cuDriverGetVersion(), "cuDriverGetVersion")
        except SuspendUnavailable as e:
            return str(e)
        except Exception as e:
            return f"the CUDA driver cannot be loaded ({e})"
        if version < MIN_DRIVER_VERSION:
            return (f"the driver's CUDA version is {version // 1000}.{version % 1000 // 10}; the checkpoint API "
                    "needs 12.8 (driver 570) or later")
        needed = ("cuCheckpointProcessLock", "CUcheckpointLockArgs", "CUprocessState")
        if not all(hasattr(cu, name) for name in needed) or _bindings_version() in ((13, 0, 0), (13, 0, 1)):
            return "this cuda-bindings has no checkpoint API (install cuda-bindings 12.8+ or 13.0.2+)"
        self._driver = cu
        return None

    def _cuda_pids(self, cu: Any, root: int) -> tuple[list[int], list[str]]:
        """The processes of the tree under `root` that hold the GPU and that the driver knows;
        with the driver's answer for each that it does not."""
        pids, answers = [], []
        for p in _tree(root):
            if not _has_gpu_open(p):
                continue
            try:
                state = self._call(cu, "cuCheckpointProcessGetState", p)
            except SuspendUnavailable as e:
                answers.append(f"pid {p}: {e}")
                continue
            if int(state) != int(cu.CUprocessState.CU_PROCESS_STATE_RUNNING):
                answers.append(f"pid {p}: its CUDA state is {state!r}, not running")
                continue
            pids.append(p)
        return pids, answers

    def _call(self, cu: Any, name: str, *args: Any) -> Any:
        try:
            result = getattr(cu, name)(*args)
        except Exception as e:  # a binding whose driver lacks the symbol raises
            raise SuspendUnavailable(f"{name}: {e}") from None
        return self._check(cu, result, name, args[0] if args else None)

    @staticmethod
    def _check(cu: Any, result: Any, name: str, pid: int | None = None) -> Any:
        err, *values = result
        if err != cu.CUresult.CUDA_SUCCESS:
            _, text = cu.cuGetErrorName(err)
            answer = text.decode() if isinstance(text, bytes) else str(err)
            raise SuspendUnavailable(f"{name}({'' if pid is None else pid}) answered {answer}")
        return values[0] if len(values) == 1 else None


def _bindings_version() -> tuple[int, ...]:
    try:
        from cuda import bindings

        return tuple(int(part) for part in bindings.__version__.split(".")[:3])
    except (ImportError, AttributeError, ValueError):
        return ()


def _tree(root: int) -> list[int]:
    try:
        proc = psutil.Process(root)
        return [root, *(c.pid for c in proc.children(recursive=True))]
    except psutil.Error:
        return []


def _has_gpu_open(pid: int) -> bool:
    """The process has an NVIDIA device file open (/dev/nvidiactl, /dev/nvidiaN...)."""
    folder = f"/proc/{pid}/fd"
    with contextlib.suppress(OSError):
        for fd in os.listdir(folder):
            with contextlib.suppress(OSError):
                if os.readlink(f"{folder}/{fd}").startswith("/dev/nvidia"):
                    return True
    return False


def _rss(pids: list[int]) -> int:
    total = 0
    for p in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(p).memory_info().rss
    return total
