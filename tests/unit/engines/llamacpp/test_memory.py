"""The asleep tier's madvise helpers on memory of our own: what a block mapped is found (and
nothing mapped before it), and dropping it gives the pages back, zeroed, its first page kept."""

from __future__ import annotations

import ctypes
import mmap

from dormant.engines.llamacpp import memory

MiB = 1 << 20
PRIVATE = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS  # as malloc maps large blocks


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def test_a_mapping_made_in_the_block_is_found_and_dropped_to_zeros():
    before = mmap.mmap(-1, 32 * MiB, flags=PRIVATE)
    with memory.AnonymousMappings() as added:
        buf = mmap.mmap(-1, 64 * MiB, flags=PRIVATE)
    small = mmap.mmap(-1, 1 * MiB, flags=PRIVATE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert address in {start for start, _ in added.regions}
    assert address + 64 * MiB in {end for _, end in added.regions}
    assert ctypes.addressof(ctypes.c_char.from_buffer(before)) not in {start for start, _ in added.regions}
    buf.write(b"\x01" * (64 * MiB))
    written = rss_bytes()
    memory.drop([r for r in added.regions if r[0] == address])
    assert written - rss_bytes() > 60 * MiB
    assert buf[:4] == b"\x01" * 4 and buf[mmap.PAGESIZE:mmap.PAGESIZE + 4] == bytes(4)  # the first page kept
    assert buf[-1] == 0
    for m in (before, buf, small):
        m.close()


def test_the_pages_of_a_mapped_file_leave_the_process_and_read_back(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * (128 * 1024))  # 32 MiB
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    checksum = sum(mapped[::4096])
    touched = rss_bytes()
    [region] = memory.file_regions(path)
    memory.drop([region], keep_first_page=False)
    assert touched - rss_bytes() > 24 * MiB
    assert sum(mapped[::4096]) == checksum
    mapped.close()
