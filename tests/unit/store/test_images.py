"""Engine image files without a model: atomic write, modes, verified parallel reads."""

from __future__ import annotations

import ctypes
import errno
import os
import stat

import pytest

from dormant.store.image_reader import aligned_buffer, read_image
from dormant.store.images import EngineImage, ImageCorrupt, ImageMissing, ImageStale, delete_image

BLOCK = 1 << 20
LAYOUT = {"params": {"w": {"offset": 0, "dtype": "uint8", "shape": [1]}}, "total_bytes": 1}
PRINT = {"model_files": [], "versions": {"torch": "x"}, "dtype": "float32", "device": "cpu"}


@pytest.fixture
def source():
    nbytes = 5 * BLOCK + 1234  # not a multiple of the block or of 4096: exercises the tail
    buf, address = aligned_buffer(nbytes)
    buf[:nbytes] = os.urandom(nbytes)
    return buf, address, nbytes


def write(tmp_path, source) -> EngineImage:
    _, address, nbytes = source
    image = EngineImage(tmp_path / "images" / "m-1")
    image.write(address, nbytes, layout=LAYOUT, startup={"num_kv_blocks": 4}, fingerprint=PRINT, block_bytes=BLOCK)
    return image


@pytest.mark.timeout(30)
@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("offset", [0, 64])  # aligned: straight into the destination; else staged
def test_round_trip(tmp_path, source, direct, offset):
    buf, _, nbytes = source
    image = write(tmp_path, source)
    manifest = image.check(PRINT, LAYOUT)
    dest, address = aligned_buffer(nbytes + offset)
    stats = read_image(image.data_path, manifest, address + offset, threads=3, direct=direct)
    assert dest[offset:offset + nbytes] == buf[:nbytes]
    assert stats.nbytes == nbytes and manifest.startup == {"num_kv_blocks": 4}


@pytest.mark.timeout(30)
def test_files_are_private_and_the_folder_0700(tmp_path, source):
    image = write(tmp_path, source)
    assert stat.S_IMODE(image.folder.stat().st_mode) == 0o700
    for path in (image.data_path, image.manifest_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert image.data_path.stat().st_size % 4096 == 0
    assert sorted(p.name for p in image.folder.iterdir()) == ["manifest.json", "weights.bin"]  # no temp files


@pytest.mark.timeout(30)
def test_flipped_byte_truncation_and_stale_fingerprint_are_caught(tmp_path, source):
    _, _, nbytes = source
    image = write(tmp_path, source)
    manifest = image.check(PRINT, LAYOUT)
    dest, address = aligned_buffer(nbytes)
    with open(image.data_path, "r+b") as f:
        f.seek(3 * BLOCK + 17)
        byte = f.read(1)
        f.seek(3 * BLOCK + 17)
        f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(ImageCorrupt, match="block 3"):
        read_image(image.data_path, manifest, address, threads=2)
    os.truncate(image.data_path, 2 * BLOCK)
    with pytest.raises(ImageCorrupt, match="truncated"):
        image.check(PRINT, LAYOUT)
    with pytest.raises(ImageStale, match="versions"):
        image.check({**PRINT, "versions": {"torch": "y"}}, LAYOUT)
    with pytest.raises(ImageStale, match="layout"):
        image.check(PRINT, {**LAYOUT, "total_bytes": 2})
    assert delete_image(image.folder) and not image.folder.exists()
    with pytest.raises(ImageMissing):
        image.check(PRINT, LAYOUT)
    assert not delete_image(tmp_path)  # not an image folder: refused


@pytest.mark.timeout(30)
def test_reads_smaller_than_the_checksum_block_are_handed_to_deliver(tmp_path, source):
    """The GPU path: reads of its own size into staging, each delivered once, sums unchecked."""
    buf, _, nbytes = source
    manifest = write(tmp_path, source).check(PRINT, LAYOUT)
    dest, address = aligned_buffer(nbytes)
    seen = []

    def deliver(offset, staging_address, n):
        ctypes.memmove(address + offset, staging_address, n)
        seen.append((offset, n))
        return None

    read_image(tmp_path / "images" / "m-1" / "weights.bin", manifest, None, deliver=deliver, threads=3,
               verify=False, read_bytes=BLOCK // 4)
    assert dest[:nbytes] == buf[:nbytes]
    assert sorted(seen) == [(o, min(BLOCK // 4, nbytes - o)) for o in range(0, nbytes, BLOCK // 4)]
    with pytest.raises(ValueError, match="verify=False"):
        read_image(tmp_path / "images" / "m-1" / "weights.bin", manifest, address, read_bytes=BLOCK // 4)


@pytest.mark.timeout(30)
def test_a_disk_without_room_fails_before_any_byte_is_written(tmp_path, source, monkeypatch):
    # a full disk cannot be made here: fallocate answers ENOSPC as a full one does
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    written = []
    monkeypatch.setattr(os, "posix_fallocate", full)
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: written.append(len(data)) or real_write(fd, data))
    with pytest.raises(OSError) as e:
        write(tmp_path, source)
    assert e.value.errno == errno.ENOSPC and written == []
    assert list((tmp_path / "images" / "m-1").iterdir()) == []  # no temp file left



@pytest.mark.timeout(30)
def test_the_bytes_are_asked_for_only_once_the_disk_has_room(tmp_path, source, monkeypatch):
    """`address` as a function (the GPU engine copies its weights to host memory in it): called
    once the file's blocks are taken, never when the disk is full."""
    buf, address, nbytes = source
    asked = []

    def bytes_now() -> int:
        asked.append(os.path.exists(image.folder))
        return address

    image = EngineImage(tmp_path / "images" / "m-1")
    image.write(bytes_now, nbytes, layout=LAYOUT, startup={}, fingerprint=PRINT, block_bytes=BLOCK)
    dest, out = aligned_buffer(nbytes)
    read_image(image.data_path, image.check(PRINT, LAYOUT), out, threads=2)
    assert asked == [True] and dest[:nbytes] == buf[:nbytes]

    monkeypatch.setattr(os, "posix_fallocate", lambda fd, offset, length: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    image.delete()
    with pytest.raises(OSError):
        image.write(bytes_now, nbytes, layout=LAYOUT, startup={}, fingerprint=PRINT, block_bytes=BLOCK)
    assert asked == [True]
