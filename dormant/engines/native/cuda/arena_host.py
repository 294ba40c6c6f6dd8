"""The pinned host backup of a CudaArena: where sleep() copies the kept bytes (the weights)
and wake() copies them back from.

The backup is one HostRegion (host_region.py: anonymous memory with 2 MiB pages), planned
first and pinned in place piece by piece (arena_plan.HOST_PIECE_BYTES: touched, then
cuMemHostRegister, ~10 ms a piece) when the engine is idle, or in a background thread;
sleep() pins whatever is still missing (~0.04 s/GiB on the H200).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

from dormant.engines.native.cuda.arena_plan import HOST_PIECE_BYTES, plan_pieces, split_range
from dormant.engines.native.cuda.driver import check_cuda
from dormant.engines.native.cuda.host_region import HostRegion


class HostBackup:
    """CudaArena's base, apart because it is a second idea: it uses the arena's `nbytes`,
    `chunks`, `_cuda`, `_closed` and `_make_current`; the arena calls `_init_host_backup` when
    built and `_free_host_backup` when closed."""

    def _init_host_backup(self) -> None:
        # planned pieces, their pointers (0 = not pinned yet)
        self._host_pieces: list[tuple[int, int]] | None = None
        self._host_ptrs: list[int] = []
        self._host_region: HostRegion | None = None
        self._host_bytes = 0
        self._host_lock = threading.Lock()
        self._host_future: Future[None] | None = None  # a background pinning thread's

    @property
    def host_backup_bytes(self) -> int:
        """Bytes the host backup will hold once pinned (0: none planned)."""
        return self._host_bytes

    @property
    def host_backup_address(self) -> int:
        """Where the backup's bytes start in host memory (contiguous; 0: none planned)."""
        return self._host_region.address if self._host_region is not None else 0

    @property
    def host_backup_pending(self) -> bool:
        """A backup is planned and some of its pieces are not pinned yet."""
        return self._host_pieces is not None and not all(self._host_ptrs)

    def reserve_host_backup(self, nbytes: int | None = None,
                            piece_bytes: int = HOST_PIECE_BYTES) -> None:
        """Plan a pinned host backup of `nbytes` (default: the whole arena) for sleep to copy
        into, without pinning anything yet: pin_host_backup_step() pins it a piece at a time
        (the engine does so when idle), and sleep() pins whatever is still missing."""
        nbytes = self.nbytes if nbytes is None else min(nbytes, self.nbytes)
        with self._host_lock:
            if self._host_pieces is not None:
                raise RuntimeError("host backup already allocated")
            self._host_pieces = plan_pieces(nbytes, piece_bytes)
            self._host_ptrs = [0] * len(self._host_pieces)
            self._host_bytes = nbytes
            self._host_region = HostRegion(nbytes) if nbytes else None

    def pin_host_backup_step(self) -> bool:
        """Pin the next piece of the planned backup (~10 ms for 256 MiB: its pages touched,
        then registered). Returns whether pieces remain."""
        with self._host_lock:
            if self._closed or self._host_pieces is None:
                return False
            try:
                i = self._host_ptrs.index(0)
            except ValueError:
                return False
            region = self._host_region
            region.touch(*self._host_pieces[i])  # outside the driver: its lock is held only to register
            self._make_current()  # this thread may have no current context
            check_cuda(self._cuda.cuMemHostRegister(*region.span(*self._host_pieces[i]), 0))
            self._host_ptrs[i] = region.address + self._host_pieces[i][0]
            return i + 1 < len(self._host_ptrs)

    def allocate_host_backup(self, nbytes: int | None = None, *, background: bool = False,
                             piece_bytes: int = HOST_PIECE_BYTES,
                             pause_s: float = 0.002) -> Future[None]:
        """Plan and pin a host backup of `nbytes` (default: the whole arena) for sleep to copy
        into, in pieces of `piece_bytes` (~0.04 s/GiB; never on the wake path). background=True pins in a thread, sleeping `pause_s` between pieces so
        other threads' CUDA calls get through; sleep() waits for it. Returns a future that
        completes once everything is pinned (already done when background=False)."""
        self.reserve_host_backup(nbytes, piece_bytes)
        future: Future[None] = Future()

        def pin() -> None:
            try:
                while self.pin_host_backup_step():
                    if background and pause_s > 0:
                        time.sleep(pause_s)
                future.set_result(None)
            except BaseException as e:
                future.set_exception(e)

        if background:
            self._host_future = future
            threading.Thread(target=pin, name="cuda-arena-pin", daemon=True).start()
        else:
            pin()
            future.result()
        return future

    def _finish_host_backup(self, pause_s: float = 0.0) -> None:
        """Wait for a background pinning thread, then pin what is still missing (here),
        `pause_s` between pieces so that other threads' CUDA calls get through."""
        if self._host_future is not None:
            self._host_future.result()
        while self.pin_host_backup_step():
            if pause_s > 0:
                time.sleep(pause_s)

    def _host_segments(self, keep: int, chunk: int) -> list[tuple[int, int, int]]:
        """(arena offset, host pointer, size) of the kept bytes of arena chunk `chunk`."""
        off, size = self.chunks[chunk]
        end = min(off + size, keep)
        return [(pos, self._host_ptrs[i] + pos - self._host_pieces[i][0], n)
                for i, pos, n in split_range(off, end, self._host_pieces or [])]

    def _free_host_backup(self) -> None:
        """Wait for a background pinning thread, then unpin every piece and unmap the region
        (the arena is closing)."""
        if self._host_future is not None:
            try:
                self._host_future.result()
            except Exception:
                pass
        with self._host_lock:
            for i, host in enumerate(self._host_ptrs):
                if host:
                    check_cuda(self._cuda.cuMemHostUnregister(self._host_region.span(*self._host_pieces[i])[0]))
                    self._host_ptrs[i] = 0
            self._host_pieces = None  # nothing more is pinned after this
            if self._host_region is not None:
                self._host_region.close()
                self._host_region = None
