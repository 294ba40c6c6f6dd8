"""The asleep tier's memory, handed back without freeing what llama.cpp made: the address
ranges a load or a context creation mapped, read from /proc/self/maps, and madvise on them.

    with AnonymousMappings() as added:   # around llama_init_from_model
        ctx = ...
    added.regions                        # the (start, end) ranges it mapped, 16 MiB or more
    file_regions(gguf)                   # where the GGUF is mapped
    drop(regions)                        # MADV_DONTNEED: out of RSS until touched again

MADV_DONTNEED on a file mapping drops the process's pages; a later touch maps them again from
the page cache. On anonymous memory the pages read back as zeros: only for memory whose content
no longer matters (a cleared KV cache, a step's scratch). Each range's first page is kept: where
malloc made the mapping, its chunk header is there.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

MADV_DONTNEED = 4
MADV_NOHUGEPAGE = 15
_PAGE = os.sysconf("SC_PAGE_SIZE")
# smaller anonymous mappings are left alone: Python's and malloc's own arenas come and go
# beside a load, in other threads
MIN_REGION_BYTES = 16 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

Region = tuple[int, int]


def _mappings() -> list[tuple[int, int, str, str, str]]:
    """(start, end, permissions, inode, path) for every mapping of this process."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end, parts[1], parts[4], parts[5].strip() if len(parts) > 5 else ""))
    return out


class AnonymousMappings:
    """The private, writable, anonymous address ranges mapped inside the `with` block, less
    what was mapped before it (the kernel merges a new mapping into its neighbour)."""

    def __enter__(self) -> AnonymousMappings:
        self._before = [(start, end) for start, end, *_ in _mappings()]
        self.regions: list[Region] = []
        return self

    def __exit__(self, *exc) -> None:
        before = set(self._before)
        for start, end, perms, inode, path in _mappings():
            if (end - start >= MIN_REGION_BYTES and (start, end) not in before and perms.startswith("rw")
                    and perms.endswith("p") and inode == "0" and not path):
                overlapping = [(lo, hi) for lo, hi in self._before if lo < end and hi > start]
                self.regions += [r for r in _subtract((start, end), overlapping) if r[1] - r[0] >= MIN_REGION_BYTES]

    @property
    def num_bytes(self) -> int:
        return sum(end - start for start, end in self.regions)


def file_regions(path: Path) -> list[Region]:
    real = os.path.realpath(path)
    return [(start, end) for start, end, _, _, mapped in _mappings() if mapped == real]


def drop(regions: list[Region], keep_first_page: bool = True, small_pages: bool = False) -> None:
    """Only what is still mapped: a region found beside a later load may have gone since.
    `small_pages`: the region's pages come back 4 KiB at a time when touched again, not as
    transparent huge pages (a wake then takes back only the KV cells its steps write)."""
    mapped = [(start, end) for start, end, *_ in _mappings()]
    for start, end in regions:
        if keep_first_page:
            start += _PAGE
        for lo, hi in mapped:
            lo, hi = max(lo, start), min(hi, end)
            if lo >= hi:
                continue
            if small_pages:
                _libc.madvise(lo, hi - lo, MADV_NOHUGEPAGE)  # a kernel without THP refuses: no matter
            if _libc.madvise(lo, hi - lo, MADV_DONTNEED) != 0:
                raise OSError(ctypes.get_errno(), f"madvise({lo:#x}, {hi - lo}) failed")


def _subtract(region: Region, others: list[Region]) -> list[Region]:
    pieces = [region]
    for lo, hi in others:
        pieces = [p for start, end in pieces for p in ((start, min(end, lo)), (max(start, hi), end)) if p[0] < p[1]]
    return pieces
