"""Host-to-arena copies for one reader thread of a GPU restore (engine_image.restore_cuda)."""

from __future__ import annotations

from typing import Any

from dormant.engines.native.cuda_arena import CudaArena, check_cuda


class ArenaCopier:
    """Host-to-arena copies for one thread, with raw driver calls on a stream of its own.

    A restore streams the weights from several reader threads while the main thread captures
    the decode graphs. torch's stream, event and tensor wrappers hold the GIL for ~0.1 ms a
    copy; with 16 readers the main thread waited on the GIL at each of its own ops, and its
    first graph capture took as long as the whole read (bench/NOTES-hibernate.md). Here each
    copy is two driver calls that release the GIL, a few microseconds of Python around them.

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
        self._events: dict[int, Any] = {}

    def copy(self, offset: int, host_address: int, nbytes: int):
        if offset < 0 or offset + nbytes > self._limit:
            raise ValueError(f"copy of {nbytes} bytes at {offset} outside the arena")
        cuda = self._cuda
        event = self._events.get(host_address)
        if event is None:
            event = self._events[host_address] = check_cuda(
                cuda.cuEventCreate(cuda.CUevent_flags.CU_EVENT_DISABLE_TIMING))
        check_cuda(cuda.cuMemcpyHtoDAsync(self._base + offset, host_address, nbytes, self._stream))
        check_cuda(cuda.cuEventRecord(event, self._stream))
        return lambda: check_cuda(cuda.cuEventSynchronize(event))

    def close(self) -> None:
        cuda = self._cuda
        check_cuda(cuda.cuStreamSynchronize(self._stream))
        for event in self._events.values():
            check_cuda(cuda.cuEventDestroy(event))
        self._events.clear()
        check_cuda(cuda.cuStreamDestroy(self._stream))

