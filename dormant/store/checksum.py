"""Block checksums of engine images, cheap enough to verify at memory speed on a CPU or a GPU.

    block_checksum(memoryview_or_bytes) -> "0123...ef"     numpy, releases the GIL
    format_sums(a, b)                                       what a GPU computation reports

"wsum64" of a block: its bytes as little-endian 64-bit words w_1..w_n (the last one
zero-padded), and two sums modulo 2**64,

    a = w_1 + ... + w_n          b = 1·w_1 + 2·w_2 + ... + n·w_n

written as 32 hex digits (a, then b). `a` catches any change of a single word; the weighted
`b` also catches moved or swapped words and zeroed tails (a truncated read). It guards
against a corrupt or short file, not against someone who can write the image (the folder is
0700 and the fingerprint says what it was made from). sha256 capped a verified restore from
the page cache at ~10 GB/s with 16 reader threads (bench/README.md, "Restore: image reads and checksums"); these sums run
on the GPU at memory speed after the copies land, and on a CPU core at ~5.7 GB/s (sha256: 1.56).

Plain integer arithmetic in two's complement, so torch's int64 (GPU: no uint64 kernels) and
numpy's uint64 give the same bits.
"""

from __future__ import annotations

import functools

ALGORITHM = "wsum64"
WORD = 8
MASK = (1 << 64) - 1


def format_sums(a: int, b: int) -> str:
    return f"{a & MASK:016x}{b & MASK:016x}"


@functools.lru_cache(maxsize=4)
def _weights(n: int):
    import numpy as np

    return np.arange(1, n + 1, dtype=np.uint64)


def block_checksum(data) -> str:
    """wsum64 of a bytes-like object."""
    import numpy as np

    view = memoryview(data).cast("B")
    if len(view) % WORD:
        view = memoryview(bytes(view) + bytes(WORD - len(view) % WORD))
    words = np.frombuffer(view, dtype="<u8")
    if words.size == 0:
        return format_sums(0, 0)
    a = int(words.sum(dtype=np.uint64))
    b = int(np.dot(words, _weights(words.size)))
    return format_sums(a, b)
