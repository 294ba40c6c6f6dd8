"""wsum64 block checksums: the numpy sums (image write, CPU restore) and the torch sums (GPU
restore, run here on the CPU) agree with a plain-Python reference and catch what they must."""

from __future__ import annotations

import json
import os

import pytest

from dormant.store.checksum import block_checksum, format_sums
from dormant.store.images import EngineImage, ImageStale

MASK = (1 << 64) - 1


def reference(data: bytes) -> str:
    data = data + bytes(-len(data) % 8)
    words = [int.from_bytes(data[i:i + 8], "little") for i in range(0, len(data), 8)]
    return format_sums(sum(words) & MASK, sum((j + 1) * w for j, w in enumerate(words)) & MASK)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("nbytes", [0, 8, 13, 4096, 40_000])
def test_numpy_sums_match_the_reference(nbytes):
    data = os.urandom(nbytes)
    assert block_checksum(data) == reference(data)
    assert block_checksum(b"\xff" * 4096) == reference(b"\xff" * 4096)  # wraps modulo 2**64


@pytest.mark.timeout(30)
def test_a_flipped_bit_swapped_words_and_a_zeroed_tail_change_the_sum():
    data = bytearray(os.urandom(4096))
    good = block_checksum(data)
    flipped = bytearray(data)
    flipped[1000] ^= 1
    swapped = data[8:16] + data[:8] + data[16:]
    zeroed = data[:2048] + bytes(2048)
    assert data[:8] != data[8:16]
    for bad in (flipped, swapped, zeroed):
        assert block_checksum(bad) != good


@pytest.mark.timeout(60)
def test_torch_sums_of_each_block_match_numpy():
    torch = pytest.importorskip("torch")
    from dormant.engines.native.core.engine_image import block_checksums, verify_blocks
    from dormant.store.images import ImageCorrupt

    block = 4096
    data = os.urandom(7 * block + 200)  # a short last block
    want = [block_checksum(data[i:i + block]) for i in range(0, len(data), block)]
    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    for rows_at_once in (1, 3, 16):  # chunks that end inside, at and past the last block
        assert block_checksums(tensor, block, rows_at_once) == want
    check = {"block_bytes": block, "blocks": want}
    verify_blocks(tensor, check, "image")
    tensor[5 * block + 9] ^= 4
    with pytest.raises(ImageCorrupt, match="block 5"):
        verify_blocks(tensor, check, "image")
    with pytest.raises(ImageCorrupt, match="lists"):
        verify_blocks(tensor[:block], check, "image")


@pytest.mark.timeout(30)
def test_an_image_checksummed_by_another_algorithm_is_stale(tmp_path):
    image = EngineImage(tmp_path / "images" / "m-1")
    layout = {"params": {}, "total_bytes": 8}
    fingerprint = {"versions": {}}
    buf = bytearray(os.urandom(4096))
    import ctypes

    address = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    image.write(address, len(buf), layout=layout, startup={}, fingerprint=fingerprint, block_bytes=4096)
    assert image.check(fingerprint, layout).checksum["blocks"] == [block_checksum(buf)]
    raw = json.loads(image.manifest_path.read_text())
    raw["checksum"]["algorithm"] = "sha256"
    image.manifest_path.write_text(json.dumps(raw))
    with pytest.raises(ImageStale, match="sha256"):
        image.check(fingerprint, layout)
