"""Read an engine image at disk speed: O_DIRECT, several blocks in flight, checksums overlapped.

    read_image(path, manifest, dest_address)          CPU: straight into host memory
    read_image(path, manifest, None, deliver=...)      GPU: into staging buffers the caller
                                                       copies from (engine_image.py)

Each of `threads` readers owns its blocks (i, i + threads, ...) and, when it cannot read into
the destination directly, two aligned staging buffers. On the CPU path a reader checksums the
block it just read (checksum.py; numpy releases the GIL) while the others' reads are in
flight, so verification costs no extra pass over the data. The GPU path passes verify=False
and checks the sums on the GPU once the copies land (engine_image.py). No torch, no
safetensors, no loop over tensors.

O_DIRECT bypasses the page cache: right for a cold cache (no double copy, no eviction of
others' pages), wrong for an image already cached (it would go to the disk again), so with
`direct=None` the reader asks mincore(2) how much of the file is resident and reads through
the cache when nearly all of it is. Where the filesystem refuses O_DIRECT (tmpfs, some
overlays) the reads fall back to buffered ones, with one log line.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dormant.store.checksum import block_checksum
from dormant.store.images import DIRECT_ALIGN, ImageCorrupt, Manifest, padded

log = logging.getLogger("dormant.store")

DEFAULT_THREADS = 8  # 8-16 in flight reached the disk's 1.85 GB/s and 45.8 GB/s from page cache
# deliver(offset, staging_address, nbytes) -> a callable that blocks until the staging buffer
# may be reused (e.g. a CUDA event's synchronize), or None when it already may.
Deliver = Callable[[int, int, int], "Callable[[], None] | None"]


@dataclass
class ReadStats:
    nbytes: int
    seconds: float
    direct: bool
    threads: int

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds else 0.0


def aligned_buffer(nbytes: int) -> tuple[mmap.mmap, int]:
    """Anonymous page-aligned memory (O_DIRECT needs aligned buffers) and its address."""
    buf = mmap.mmap(-1, padded(nbytes))
    return buf, ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _view(address: int, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


def cached_fraction(path: Path) -> float:
    """Share of the file's pages in the page cache (mmap + mincore, nothing read); 0.0 when
    it cannot tell."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        size = os.path.getsize(path)
        if size == 0:
            return 0.0
        fd = os.open(path, os.O_RDONLY)
        try:
            address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        finally:
            os.close(fd)
        if address in (None, ctypes.c_void_p(-1).value):
            return 0.0
        try:
            vec = (ctypes.c_ubyte * (-(-size // mmap.PAGESIZE)))()
            if libc.mincore(address, size, vec) != 0:
                return 0.0
        finally:
            libc.munmap(address, size)
        resident = bytes(vec)
        return (len(resident) - resident.count(0)) / len(resident)
    except (OSError, AttributeError, ValueError):
        return 0.0


def open_for_read(path: Path, direct: bool | None = True) -> tuple[int, bool]:
    """(fd, is_direct); O_DIRECT when the filesystem allows it (None: unless cached)."""
    if direct is None:
        direct = cached_fraction(path) < 0.9
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError as e:
            log.info("%s: O_DIRECT refused (%s); reading through the page cache", path, e.strerror)
    return os.open(path, os.O_RDONLY), False


def read_image(path: Path, manifest: Manifest, dest_address: int | None, *, deliver: Deliver | None = None,
               threads: int = DEFAULT_THREADS, direct: bool | None = None, verify: bool = True,
               staging: Callable[[int], tuple[object, int]] = aligned_buffer,
               read_bytes: int | None = None) -> ReadStats:
    """Fill `manifest.nbytes` bytes at `dest_address` (or hand each block to `deliver`) from the
    image's data file; raise ImageCorrupt on a short read or a checksum mismatch (the bytes
    already landed are then garbage: the caller reloads from the model).

    `read_bytes`: the size of each read (default: the checksum block), only with verify=False
    (the caller checks the sums). Smaller reads mean smaller staging buffers and fewer bytes
    queued at the disk in front of other reads."""
    check = manifest.checksum
    digests = check["blocks"] if verify else None
    block = int(check["block_bytes"])
    if read_bytes is not None and read_bytes != block:
        if verify:
            raise ValueError("read_bytes other than the checksum block needs verify=False")
        block = read_bytes
    nbytes = manifest.nbytes
    num_blocks = -(-nbytes // block)
    if digests is not None and len(digests) != num_blocks:
        raise ImageCorrupt(f"{path}: manifest lists {len(digests)} checksums for {num_blocks} blocks")
    if block % DIRECT_ALIGN:
        raise ImageCorrupt(f"{path}: block size {block} is not a multiple of {DIRECT_ALIGN}")
    threads = max(1, min(threads, num_blocks))
    fd, is_direct = open_for_read(path, direct)
    started = time.perf_counter()
    # Straight into the destination when it is aligned like the file; else through staging.
    straight = deliver is None and dest_address is not None and dest_address % DIRECT_ALIGN == 0
    failure: list[BaseException] = []
    stop = threading.Event()

    def reader(first: int) -> None:
        buffers = [] if straight and padded(nbytes) == nbytes else [staging(block) for _ in range(2)]
        pending: list = [None, None]
        try:
            for k, i in enumerate(range(first, num_blocks, threads)):
                if stop.is_set():
                    return
                offset = i * block
                n = min(block, nbytes - offset)
                want = padded(n)  # O_DIRECT reads whole pages; the file is padded to match
                use_staging = not straight or offset + want > nbytes
                if use_staging:
                    if not buffers:
                        buffers.extend(staging(block) for _ in range(2))
                    slot = k % 2
                    if pending[slot] is not None:
                        pending[slot]()
                        pending[slot] = None
                    address = buffers[slot][1]
                else:
                    address = dest_address + offset
                _read_fully(fd, _view(address, want), offset, path)
                if use_staging:
                    if deliver is not None:
                        pending[slot] = deliver(offset, address, n)
                    else:
                        ctypes.memmove(dest_address + offset, address, n)
                if digests is not None:
                    got = block_checksum(_view(address, n))
                    if got != digests[i]:
                        raise ImageCorrupt(f"{path}: checksum mismatch in block {i} (bytes {offset}..{offset + n})")
            for wait in pending:
                if wait is not None:
                    wait()
        except BaseException as e:  # noqa: BLE001 - reported once, below
            failure.append(e)
            stop.set()

    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="dormant-image-read") as pool:
            list(pool.map(reader, range(threads)))
    finally:
        os.close(fd)
    if failure:
        raise failure[0]
    return ReadStats(nbytes, time.perf_counter() - started, is_direct, threads)


def _read_fully(fd: int, view: memoryview, offset: int, path: Path) -> None:
    pos = 0
    while pos < len(view):
        n = os.preadv(fd, [view[pos:]], offset + pos)
        if n <= 0:
            raise ImageCorrupt(f"{path}: truncated at byte {offset + pos}")
        pos += n
