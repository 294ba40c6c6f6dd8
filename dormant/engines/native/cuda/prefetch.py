"""Ask the kernel to read, ahead of need, the files a GPU start's first forward pages in.

    prefetch_runtime_files()        # in a GPU runner, before the image reads start

The first forward loads cuBLAS kernels from libcublasLt's pages and Triton kernels from
Triton's cache directory. With the page cache cold (a restore after a long hibernation, or
the bench's drop_caches), those reads queued behind the engine image's O_DIRECT reads, 128 MiB
in flight, and the first graph capture waited ~9 s for a 9 s image read
(bench/README.md, "Restore: cold page cache"). Issued before the image reads start, they reach the disk first.
posix_fadvise(WILLNEED) only starts readahead; on a warm cache it finds the pages present and
returns at once.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger("dormant.engine")

LIBRARIES = ("libcublasLt.so", "libcublas.so")  # mapped by torch; their kernels load lazily
MAX_CACHE_FILES = 4096  # Triton's cache can grow large: at most this many of its files


def runtime_files(maps_path: str = "/proc/self/maps", triton_cache: Path | None = None) -> list[str]:
    """The mapped cuBLAS libraries and the files of Triton's kernel cache."""
    paths: list[str] = []
    try:
        with open(maps_path) as f:
            for line in f:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if path.startswith("/") and os.path.basename(path).startswith(LIBRARIES) and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    cache = triton_cache or Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    count = 0
    for root, _dirs, files in os.walk(cache):
        for name in files:
            if count >= MAX_CACHE_FILES:
                return paths
            paths.append(os.path.join(root, name))
            count += 1
    return paths


def prefetch(paths: list[str]) -> int:
    """posix_fadvise(WILLNEED) on each file; returns the bytes asked for."""
    total = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            total += os.fstat(fd).st_size
        except OSError:
            pass
        finally:
            os.close(fd)
    return total


def prefetch_runtime_files() -> None:
    """prefetch(runtime_files()), logged. Called in the thread that then starts the image
    reads: from a helper thread, whose every syscall hands the GIL back and forth, it took
    0.4-0.6 s beside a restore's Python (bench/README.md, "Restore: the GIL")."""
    started = time.perf_counter()
    files = runtime_files()
    total = prefetch(files)
    log.info("readahead asked for %d runtime files, %.0f MB, in %.3f s", len(files), total / 1e6,
             time.perf_counter() - started)
