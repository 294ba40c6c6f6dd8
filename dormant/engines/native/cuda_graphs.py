"""CUDA graphs for decode steps, one per configured batch size.

A decode step of n sequences replays the graph of the smallest captured size >= n, the
extra rows padded (they write a scratch KV slot and read one token of it). Inputs live in
static buffers the runner fills before each replay. Graphs stay valid across sleep/wake
because the arena keeps its virtual addresses (bench/NOTES-gpu.md: a graph captured before
a sleep replayed bit-exact after three cycles).
"""

from __future__ import annotations

import bisect
from typing import Callable

DEFAULT_GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)


def graph_batch_sizes(requested: list[int] | None, max_num_seqs: int) -> list[int]:
    """The sizes to capture, ascending, none above max_num_seqs. None: the defaults up to
    max_num_seqs, plus max_num_seqs itself so every decode batch has a graph."""
    if requested is None:
        sizes = {s for s in DEFAULT_GRAPH_BATCH_SIZES if s <= max_num_seqs} | {max_num_seqs}
    else:
        sizes = {s for s in requested if 0 < s <= max_num_seqs}
    return sorted(sizes)


def padded_batch_size(num_seqs: int, sizes: list[int]) -> int | None:
    """Smallest captured size that holds num_seqs rows, or None (run eagerly)."""
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) else None


class DecodeGraphs:
    """Captures `forward(batch_size)` (which reads the runner's static buffers and returns
    its outputs: the runner's are the logits, in a buffer outside the pool, and their argmax)
    once per size, largest first so every graph shares one memory pool."""

    def __init__(self, forward: Callable[[int], "torch.Tensor"], sizes: list[int]):
        import torch

        self.sizes = sorted(sizes)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = None
        for size in reversed(self.sizes):
            forward(size)  # warm-up: Triton compiles, cuBLAS picks its kernels
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = forward(size)
            pool = graph.pool()
            self._graphs[size] = (graph, out)
        torch.cuda.synchronize()

    def padded_size(self, num_seqs: int) -> int | None:
        return padded_batch_size(num_seqs, self.sizes)

    def replay(self, size: int):
        graph, out = self._graphs[size]
        graph.replay()
        return out
