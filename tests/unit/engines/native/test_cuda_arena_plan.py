"""The CUDA arena's plans (chunks, host pieces, ranges) and its CUDA-free import, on the CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dormant.engines.native.cuda.arena_plan import MiB, plan_chunks, plan_pieces, round_up, split_range

GiB = 1 << 30


def test_round_up():
    assert round_up(1, 2 * MiB) == 2 * MiB
    assert round_up(2 * MiB, 2 * MiB) == 2 * MiB
    assert round_up(2 * MiB + 1, 2 * MiB) == 4 * MiB


def test_plan_chunks_covers_the_rounded_size_in_granular_chunks():
    g = 2 * MiB
    nbytes = 16_381_478_912  # Qwen3-8B bf16 weights
    chunks = plan_chunks(nbytes, 512 * MiB, g)
    assert chunks[0] == (0, 512 * MiB)
    assert sum(size for _, size in chunks) == round_up(nbytes, g)
    assert all(size % g == 0 and off % g == 0 for off, size in chunks)
    assert all(a + s == b for (a, s), (b, _) in zip(chunks, chunks[1:]))  # contiguous
    assert len(chunks) == -(-round_up(nbytes, g) // (512 * MiB))


def test_plan_chunks_small_arena_and_odd_chunk_size():
    assert plan_chunks(1, 512 * MiB, 2 * MiB) == [(0, 2 * MiB)]
    # a chunk size off the granularity is rounded up to it
    assert plan_chunks(10 * MiB, 3 * MiB, 2 * MiB) == [(0, 4 * MiB), (4 * MiB, 4 * MiB),
                                                       (8 * MiB, 2 * MiB)]
    with pytest.raises(ValueError):
        plan_chunks(0, 512 * MiB, 2 * MiB)


def test_plan_pieces_covers_the_backup_exactly():
    assert plan_pieces(0, 64 * MiB) == []
    assert plan_pieces(100, 64) == [(0, 64), (64, 36)]
    pieces = plan_pieces(16_381_478_912, 64 * MiB)
    assert sum(size for _, size in pieces) == 16_381_478_912
    assert all(a + s == b for (a, s), (b, _) in zip(pieces, pieces[1:]))
    with pytest.raises(ValueError):
        plan_pieces(10, 0)


def test_split_range_cuts_an_arena_chunk_at_the_host_pieces():
    pieces = plan_pieces(1000, 64)
    assert split_range(0, 64, pieces) == [(0, 0, 64)]
    assert split_range(60, 200, pieces) == [(0, 60, 4), (1, 64, 64), (2, 128, 64), (3, 192, 8)]
    assert split_range(960, 1000, pieces) == [(15, 960, 40)]
    assert split_range(5, 5, pieces) == [] and split_range(5, 3, []) == []
    parts = split_range(10, 999, pieces)
    assert sum(n for _, _, n in parts) == 989
    assert all(pieces[i][0] <= off and off + n <= pieces[i][0] + pieces[i][1] for i, off, n in parts)
    with pytest.raises(ValueError):
        split_range(0, 1001, pieces)


def test_import_touches_no_cuda():
    """The module must import on a machine without an NVIDIA driver: cuda.bindings raises
    there, so nothing CUDA may happen at import."""
    code = ("import sys, torch\n"
            "import dormant.engines.native.cuda.arena as m\n"
            "assert 'cuda.bindings' not in sys.modules, 'cuda.bindings imported at import'\n"
            "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'\n"
            "print(m.CudaArena.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "CudaArena"
