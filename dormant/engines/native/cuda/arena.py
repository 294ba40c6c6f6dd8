"""One GPU region that can sleep (physical memory released) and wake at the same addresses.

The engine puts weights and KV cache in a `CudaArena` and reads them through tensor views.
The region is reserved with the CUDA virtual memory driver API (DESIGN.md §4a): a virtual
address range that never changes, backed by a few large physical chunks. `sleep()` copies the
bytes worth keeping (weights) into a pinned host backup and releases the chunks; `wake()`
creates new chunks, maps them at the same addresses and copies back, so tensor views, CUDA
graphs and compiled kernels stay valid across a sleep.

    arena = CudaArena(16 << 30)
    w = arena.tensor(0, (4096, 4096), torch.bfloat16)    # a view, no copy
    arena.reserve_host_backup(weights_end)               # plan the pinned backup ...
    while arena.pin_host_backup_step(): ...              # ... pin it piece by piece when idle
    arena.sleep(keep_bytes=weights_end)                  # KV past weights_end is dropped
    events = arena.wake(pipelined=True)                  # one event per chunk (§4c)
    torch.cuda.current_stream().wait_event(events[arena.chunk_of(layer0_offset)])

Never touch a view while the arena sleeps: its addresses are unmapped and the access is a
fatal (sticky) CUDA error. One owner (the engine's model runner) calls these methods.

Nothing CUDA happens at import: `cuda.bindings` raises on a machine without an NVIDIA driver,
so it is imported inside the constructor, and this module imports on CPU-only machines.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from dormant.engines.native.cuda.arena_host import HostBackup
from dormant.engines.native.cuda.arena_plan import DEFAULT_CHUNK_BYTES, plan_chunks
from dormant.engines.native.cuda.driver import check_cuda

if TYPE_CHECKING:
    import torch

MEMORY_POLL_S = 0.001  # a wake waiting for device memory another process is releasing


class _DeviceBuffer:
    """What `torch.as_tensor` reads to view raw device memory without copying."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3,
        }


class CudaArena(HostBackup):
    """A fixed virtual range of `nbytes` (rounded up to the allocation granularity) on
    `device`, backed by physical chunks of about `chunk_bytes` that sleep/wake release and
    recreate. States: awake (mapped) -> sleep() -> sleeping -> wake() -> awake; close() from
    either frees everything, after which the object is unusable."""

    def __init__(self, nbytes: int, device: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        import torch
        from cuda.bindings import driver as cuda

        self._cuda = cuda
        self.device = device
        # torch first, so the driver's primary context (the one torch uses) exists.
        torch.cuda.init()
        torch.cuda.set_device(device)
        torch.empty(1, device=f"cuda:{device}")
        check_cuda(cuda.cuInit(0))
        self._cu_device = check_cuda(cuda.cuDeviceGet(device))
        self._ctx = check_cuda(cuda.cuDevicePrimaryCtxRetain(self._cu_device))
        self._make_current()

        prop = cuda.CUmemAllocationProp()
        prop.type = cuda.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cuda.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device
        self._prop = prop
        access = cuda.CUmemAccessDesc()
        access.location.type = cuda.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = device
        access.flags = cuda.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = access
        self.granularity = int(check_cuda(cuda.cuMemGetAllocationGranularity(
            prop, cuda.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM)))

        self.chunks = plan_chunks(nbytes, chunk_bytes, self.granularity)
        self.nbytes = sum(size for _, size in self.chunks)
        self.ptr = int(check_cuda(cuda.cuMemAddressReserve(self.nbytes, self.granularity, 0, 0)))
        self._handles: list[Any] = [None] * len(self.chunks)
        self._stream = torch.cuda.Stream(device)
        self._init_host_backup()
        self._kept_bytes = 0
        self._backup_holds = 0  # bytes from the start the host backup has a copy of
        self._filling: tuple[torch.cuda.Event, int] | None = None  # fill_host_backup(wait=False)'s
        self._closed = False
        try:
            for i in range(len(self.chunks)):
                self._map_chunk(i)
        except BaseException:
            self.close()
            raise
        self._base = torch.as_tensor(_DeviceBuffer(self.ptr, self.nbytes),
                                     device=f"cuda:{device}")
        if self._base.data_ptr() != self.ptr:  # as_tensor copied: views would not alias
            self.close()
            raise RuntimeError("torch.as_tensor copied the arena instead of viewing it")

    # -- state ------------------------------------------------------------------------------

    @property
    def is_sleeping(self) -> bool:
        return not self._closed and self._handles[0] is None

    @property
    def mapped_bytes(self) -> int:
        return sum(size for (_, size), h in zip(self.chunks, self._handles) if h is not None)

    def chunk_of(self, offset: int) -> int:
        """Index of the chunk (and of wake's event) that holds byte `offset`."""
        if not 0 <= offset < self.nbytes:
            raise ValueError(f"offset {offset} outside the arena of {self.nbytes} bytes")
        return offset // self.chunks[0][1]

    # -- views --------------------------------------------------------------------------------

    def tensor(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor viewing the arena from byte `offset` (a multiple of the dtype's
        size; 256 keeps kernels' vector loads aligned). It shares memory, never copies."""
        import math

        itemsize = dtype.itemsize
        size = math.prod(shape) * itemsize
        if offset % itemsize or offset < 0 or offset + size > self.nbytes:
            raise ValueError(f"view of {size} bytes at offset {offset} does not fit the arena "
                             f"of {self.nbytes} bytes aligned to {itemsize}")
        return self._base.narrow(0, offset, size).view(dtype).view(shape)

    # -- sleep / wake -------------------------------------------------------------------------

    def sleep(self, keep_bytes: int | None = None, reuse_backup: bool = False) -> None:
        """Copy the first `keep_bytes` (default all) to the host backup, then release the
        physical memory; the virtual range stays reserved. Bytes past `keep_bytes` (the KV
        cache) are lost. Waits for all work on the device first. Each chunk is released as
        soon as its bytes are out, so another process's wake can map them meanwhile (a switch
        costs about one copy: the two go opposite ways over PCIe). reuse_backup: the kept
        bytes have not changed since the backup last took them (weights: read-only while
        awake), so where it holds them already nothing is copied, and the device memory is
        released at once. Sleeping: no-op."""
        import torch

        self._require_open()
        if self.is_sleeping:
            return
        keep = self.nbytes if keep_bytes is None else keep_bytes
        if not 0 <= keep <= self.nbytes:
            raise ValueError(f"keep_bytes {keep} outside 0..{self.nbytes}")
        if keep:
            if self._host_pieces is None:
                self.reserve_host_backup()  # pins now; plan and pin it earlier
            self._finish_host_backup()
            if keep > self._host_bytes:
                raise ValueError(f"keep_bytes {keep} exceeds the host backup of "
                                 f"{self._host_bytes} bytes")
        self._make_current()
        # Every stream, not only ours: a kernel still reading the arena must finish before
        # its memory is unmapped (and a fill of the backup under way is done).
        torch.cuda.synchronize(self.device)
        copy = keep if not (reuse_backup and keep <= self.backup_holds) else 0
        stream = self._cuda.CUstream(self._stream.cuda_stream)
        out: list[tuple[int, torch.cuda.Event]] = []
        for i in range(len(self.chunks)):
            segments = self._host_segments(copy, i)
            if not segments:  # nothing to copy (KV cache, or in the backup already): release it now
                self._unmap_chunk(i)
                continue
            for off, host, n in segments:
                check_cuda(self._cuda.cuMemcpyDtoHAsync(host, self.ptr + off, n, stream))
            event = torch.cuda.Event()
            event.record(self._stream)
            out.append((i, event))
        for i, event in out:
            event.synchronize()
            self._unmap_chunk(i)
        self._kept_bytes = keep
        self._backup_holds = max(self._backup_holds, copy)

    def fill_host_backup(self, nbytes: int, wait: bool = True, pause_s: float = 0.002) -> int:
        """Copy the first `nbytes` into the host backup now, awake, on a stream of this call's
        own (the device keeps running the model): an engine image is written from there, and a
        sleep that may reuse the backup copies nothing. Pins what the backup still misses
        first, a piece at a time, `pause_s` between pieces so that other threads' CUDA calls
        get through. wait=False returns once the copies are queued (backup_holds counts them
        when done; a sleep meanwhile waits for them). Not beside sleep() or wake() (the caller
        keeps them apart). Returns the backup's host address (its bytes are contiguous)."""
        import torch

        self._require_open()
        if self.is_sleeping:
            raise RuntimeError("fill_host_backup: the arena is asleep (its backup holds the kept bytes)")
        if self._host_pieces is None:
            self.reserve_host_backup()
        if nbytes > self._host_bytes:
            raise ValueError(f"{nbytes} bytes exceed the host backup of {self._host_bytes} bytes")
        self._finish_host_backup(pause_s)
        self._make_current()
        stream = torch.cuda.Stream(self.device)
        handle = self._cuda.CUstream(stream.cuda_stream)
        for i in range(len(self.chunks)):
            for off, host, n in self._host_segments(nbytes, i):
                check_cuda(self._cuda.cuMemcpyDtoHAsync(host, self.ptr + off, n, handle))
        done = torch.cuda.Event()
        done.record(stream)
        self._filling = (done, nbytes)
        if wait:
            done.synchronize()
        self._count_fill()
        return self._host_region.address

    @property
    def backup_holds(self) -> int:
        """Bytes from the arena's start that the host backup holds a copy of (0: none yet)."""
        self._count_fill()
        return self._backup_holds

    @property
    def backup_filling(self) -> bool:
        """A fill_host_backup(wait=False) whose copies are still under way."""
        self._count_fill()
        return self._filling is not None

    def _count_fill(self) -> None:
        if self._filling is not None and self._filling[0].query():
            self._backup_holds = max(self._backup_holds, self._filling[1])
            self._filling = None

    def wake(self, pipelined: bool = False, wait_for_memory_s: float = 0.0) -> list[torch.cuda.Event]:
        """Map new physical memory at the same addresses and copy the kept bytes back, chunk
        by chunk on a side stream. Returns one event per chunk, recorded once that chunk's
        bytes are back. pipelined=False waits for all of them before returning; with
        pipelined=True the caller makes its stream wait on the events of the chunks it reads
        (chunk_of(offset)). wait_for_memory_s: how long a chunk may wait for device memory
        that another process is releasing (its sleep frees chunk by chunk) before the
        out-of-memory error is raised. Awake: no-op, returns []."""
        import torch

        self._require_open()
        if not self.is_sleeping:
            return []
        self._make_current()
        stream = self._cuda.CUstream(self._stream.cuda_stream)
        events = []
        deadline = time.monotonic() + wait_for_memory_s
        try:
            for i in range(len(self.chunks)):
                self._map_chunk(i, deadline)
                for seg_off, host, n in self._host_segments(self._kept_bytes, i):
                    check_cuda(self._cuda.cuMemcpyHtoDAsync(self.ptr + seg_off, host, n, stream))
                event = torch.cuda.Event()
                event.record(self._stream)
                events.append(event)
        except BaseException:  # still asleep, whole: the backup holds the bytes
            self._stream.synchronize()
            for i in range(len(self.chunks)):
                self._unmap_chunk(i)
            raise
        if not pipelined:
            self._stream.synchronize()
        return events

    def close(self) -> None:
        """Release the physical memory, the virtual range, the host backup and the context
        reference. Views made by tensor() must not be used afterwards. Idempotent."""
        import torch

        if self._closed:
            return
        self._make_current()
        torch.cuda.synchronize(self.device)
        self._base = None
        for i in range(len(self.chunks)):
            self._unmap_chunk(i)
        if getattr(self, "ptr", 0):
            check_cuda(self._cuda.cuMemAddressFree(self.ptr, self.nbytes))
        self._free_host_backup()
        check_cuda(self._cuda.cuDevicePrimaryCtxRelease(self._cu_device))
        self._closed = True

    def __enter__(self) -> CudaArena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- driver plumbing ----------------------------------------------------------------------

    def _make_current(self) -> None:
        check_cuda(self._cuda.cuCtxSetCurrent(self._ctx))

    def _map_chunk(self, i: int, deadline: float = 0.0) -> None:
        """Back chunk `i` with new physical memory; while the device has none, look again every
        MEMORY_POLL_S until `deadline` (time.monotonic()), then raise."""
        off, size = self.chunks[i]
        while True:
            err, handle = self._cuda.cuMemCreate(size, self._prop, 0)
            if err != self._cuda.CUresult.CUDA_ERROR_OUT_OF_MEMORY or time.monotonic() >= deadline:
                break
            time.sleep(MEMORY_POLL_S)
        check_cuda((err,))
        try:
            check_cuda(self._cuda.cuMemMap(self.ptr + off, size, 0, handle, 0))
        except BaseException:
            check_cuda(self._cuda.cuMemRelease(handle))
            raise
        self._handles[i] = handle
        check_cuda(self._cuda.cuMemSetAccess(self.ptr + off, size, [self._access], 1))

    def _unmap_chunk(self, i: int) -> None:
        handle = self._handles[i]
        if handle is None:
            return
        off, size = self.chunks[i]
        check_cuda(self._cuda.cuMemUnmap(self.ptr + off, size))
        check_cuda(self._cuda.cuMemRelease(handle))
        self._handles[i] = None

    def _require_open(self) -> None:
        if self._closed:
            raise RuntimeError("the arena is closed")
