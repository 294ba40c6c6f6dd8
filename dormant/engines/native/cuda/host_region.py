"""Host memory to pin in place: anonymous memory from mmap, advised to 2 MiB pages, its pages
first touched by torch's CPU threads, then registered with the driver piece by piece.

    region = HostRegion(nbytes)          # virtual only: nothing is touched or pinned yet
    region.touch(offset, size)           # fault the pages in, on torch's threads
    region.address + offset              # what cuMemHostRegister pins (arena_host.py)
    region.close()                       # munmap; unregister every piece first

Why not cuMemHostAlloc: on the H200 it pinned 8 GiB at 0.41 s/GiB, and another thread's CUDA
calls waited up to 0.48 s meanwhile; the same bytes touched here and registered took
0.036 s/GiB (2 MiB pages; 0.079 s/GiB with 4 KiB pages), with the same 55 GB/s copies to the
GPU (bench/results/pin/latest.json, bench/README.md "Arena: pinning the host backup").

Plain libc calls: importable and testable without CUDA.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap

PAGE = mmap.PAGESIZE
HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # linux/mman.h

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class HostRegion:
    """`nbytes` (rounded up to 2 MiB) of private anonymous memory at a fixed address."""

    def __init__(self, nbytes: int) -> None:
        if nbytes <= 0:
            raise ValueError("nbytes must be positive")
        self.nbytes = round_up(nbytes, HUGE_PAGE)
        address = _libc.mmap(None, self.nbytes, mmap.PROT_READ | mmap.PROT_WRITE,
                             mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if address in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap of {self.nbytes} bytes failed")
        self.address = int(address)
        # Advice only: a kernel without transparent huge pages keeps 4 KiB pages (slower to pin)
        self.huge_pages = _libc.madvise(self.address, self.nbytes, MADV_HUGEPAGE) == 0

    def span(self, offset: int, size: int) -> tuple[int, int]:
        """(address, size) of [offset, offset + size) widened to whole pages, as pinning wants."""
        if offset < 0 or size <= 0 or offset + size > self.nbytes:
            raise ValueError(f"{size} bytes at {offset} outside the region of {self.nbytes}")
        start = offset // PAGE * PAGE
        return self.address + start, min(round_up(offset + size, PAGE), self.nbytes) - start

    def touch(self, offset: int, size: int) -> None:
        """Fault in the pages of [offset, offset + size): one write per page, spread over
        torch's CPU threads (the kernel zeroes each page on its first touch)."""
        import torch

        address, size = self.span(offset, size)
        view = torch.frombuffer((ctypes.c_char * size).from_address(address), dtype=torch.uint8)
        view[::PAGE].zero_()

    def close(self) -> None:
        """Unmap; idempotent. Nothing may still pin or view the memory."""
        if self.address:
            address, self.address = self.address, 0
            if _libc.munmap(address, self.nbytes) != 0:
                raise OSError(ctypes.get_errno(), "munmap failed")
