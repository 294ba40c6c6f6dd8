"""Host-to-arena copies for one reader thread of a GPU restore (engine_image.restore_cuda)."""

from __future__ import annotations

import ctypes
from typing import Any

from dormant.engines.native.cuda.arena import CudaArena
from dormant.engines.native.cuda.driver import check_cuda

CUDA_ERROR_NOT_READY = 600


class ArenaCopier:
    """Host-to-arena copies for one thread, with raw driver calls on a stream of its own.

    A restore streams the weights from several reader threads while the main thread captures
    the decode graphs, and every time a reader takes the GIL back the main thread stops. A
    copy is queued by two driver calls that return in microseconds (cuMemcpyHtoDAsync,
    cuEventRecord), so they are made through ctypes.PyDLL, which keeps the GIL: through
    cuda-bindings, which releases it around each call, a reader gave it up and waited for it
    again three or four times a block instead of once, at its read (bench/README.md, "Restore: the GIL").
    Only a wait that may block (the staging buffer's last copy not landed yet) releases it.

        copier = ArenaCopier(arena)                 # in the thread that copies
        wait = copier.copy(offset, host_address, n) # queued; wait() blocks until it landed
        copier.close()                              # waits for all, frees stream and events

    The host memory must be pinned and stay unchanged until wait() returns. One event per
    distinct host address: a thread reusing a few staging buffers reuses their events.
    """

    def __init__(self, arena: CudaArena) -> None:
        cuda = arena._cuda
        self._cuda = cuda
        self._base = arena.ptr
        self._limit = arena.nbytes
        arena._make_current()
        self._stream = check_cuda(cuda.cuStreamCreate(cuda.CUstream_flags.CU_STREAM_NON_BLOCKING))
        self._stream_handle = ctypes.c_void_p(int(self._stream))
        self._events: dict[int, Any] = {}
        self._driver = _driver()

    def copy(self, offset: int, host_address: int, nbytes: int):
        if offset < 0 or offset + nbytes > self._limit:
            raise ValueError(f"copy of {nbytes} bytes at {offset} outside the arena")
        cuda = self._cuda
        event = self._events.get(host_address)
        if event is None:
            created = check_cuda(cuda.cuEventCreate(cuda.CUevent_flags.CU_EVENT_DISABLE_TIMING))
            event = self._events[host_address] = (created, ctypes.c_void_p(int(created)))
        quick, _ = self._driver
        _check(quick.cuMemcpyHtoDAsync_v2(ctypes.c_uint64(self._base + offset), ctypes.c_void_p(host_address),
                                          ctypes.c_size_t(nbytes), self._stream_handle), "cuMemcpyHtoDAsync")
        _check(quick.cuEventRecord(event[1], self._stream_handle), "cuEventRecord")
        return lambda: self._wait(event[1])

    def _wait(self, event: ctypes.c_void_p) -> None:
        quick, blocking = self._driver
        status = quick.cuEventQuery(event)  # nearly always landed: 8 MiB copy in ~0.2 ms
        if status == CUDA_ERROR_NOT_READY:
            status = blocking.cuEventSynchronize(event)
        _check(status, "cuEventSynchronize")

    def close(self) -> None:
        cuda = self._cuda
        check_cuda(cuda.cuStreamSynchronize(self._stream))
        for created, _ in self._events.values():
            check_cuda(cuda.cuEventDestroy(created))
        self._events.clear()
        check_cuda(cuda.cuStreamDestroy(self._stream))


_DRIVER: tuple[ctypes.PyDLL, ctypes.CDLL] | None = None


def _driver() -> tuple[ctypes.PyDLL, ctypes.CDLL]:
    """libcuda twice: as PyDLL (calls keep the GIL) and as CDLL (calls release it)."""
    global _DRIVER
    if _DRIVER is None:
        quick, blocking = ctypes.PyDLL("libcuda.so.1"), ctypes.CDLL("libcuda.so.1")
        for lib in (quick, blocking):
            lib.cuMemcpyHtoDAsync_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            lib.cuEventRecord.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
            lib.cuEventQuery.argtypes = [ctypes.c_void_p]
            lib.cuEventSynchronize.argtypes = [ctypes.c_void_p]
            for fn in (lib.cuMemcpyHtoDAsync_v2, lib.cuEventRecord, lib.cuEventQuery, lib.cuEventSynchronize):
                fn.restype = ctypes.c_int
        _DRIVER = quick, blocking
    return _DRIVER


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed: CUresult {status}")
