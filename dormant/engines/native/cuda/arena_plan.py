"""How a CudaArena is cut up: its physical chunks, its pinned host pieces, and the copies
between them. Plain arithmetic, testable without CUDA; cuda/arena.py does the driver calls.
"""

from __future__ import annotations

MiB = 1 << 20
# 256 MiB chunks: on the H100 a pipelined wake of 16.4 GB landed its first chunk in 9.8 ms
# (512 MiB: 20 ms, 1 GiB: 39 ms) with the whole wake unchanged at 0.33 s; 64 mappings for
# 16 GiB cost 4.5 ms of host time in all (bench/README.md, "Arena: chunk size and mapping").
DEFAULT_CHUNK_BYTES = 256 * MiB
# The pinned host backup is pinned in pieces of this size, one cuMemHostRegister each (arena_host.py):
# one call holds the driver's lock, and other threads' CUDA calls wait for it; 256 MiB of 2 MiB
# pages registers in ~5 ms on the H200 (bench/results/pin/latest.json), so other work interleaves.
HOST_PIECE_BYTES = 256 * MiB


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plan_chunks(nbytes: int, chunk_bytes: int, granularity: int) -> list[tuple[int, int]]:
    """(offset, size) of each physical chunk of an arena of `nbytes`, every size a multiple of
    `granularity`; the total is `nbytes` rounded up to the granularity."""
    if nbytes <= 0 or chunk_bytes <= 0 or granularity <= 0:
        raise ValueError("nbytes, chunk_bytes and granularity must be positive")
    total = round_up(nbytes, granularity)
    chunk = round_up(chunk_bytes, granularity)
    return [(off, min(chunk, total - off)) for off in range(0, total, chunk)]


def plan_pieces(nbytes: int, piece_bytes: int) -> list[tuple[int, int]]:
    """(offset, size) of the host backup's pinned pieces covering `nbytes` (no rounding: host
    allocations need no granularity). Empty for nbytes 0."""
    if nbytes < 0 or piece_bytes <= 0:
        raise ValueError("nbytes must be >= 0 and piece_bytes positive")
    return [(off, min(piece_bytes, nbytes - off)) for off in range(0, nbytes, piece_bytes)]


def split_range(start: int, end: int, pieces: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """The byte range [start, end) cut at the pieces' boundaries: (piece index, offset, size)
    for each part, in order. The range must lie inside the pieces (contiguous from 0)."""
    if start >= end:
        return []
    if not pieces or start < 0 or end > pieces[-1][0] + pieces[-1][1]:
        raise ValueError(f"range {start}..{end} outside the pieces")
    piece = pieces[0][1]  # all pieces but the last have this size
    out = []
    i = start // piece
    pos = start
    while pos < end:
        off, size = pieces[i]
        n = min(end, off + size) - pos
        out.append((i, pos, n))
        pos += n
        i += 1
    return out
