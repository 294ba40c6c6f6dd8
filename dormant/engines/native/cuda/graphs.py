"""CUDA graphs for decode steps, one per configured batch size.

A decode step of n sequences replays the graph of the smallest captured size >= n, the
extra rows padded (they write a scratch KV slot and read one token of it); a step never
captures one itself (issue 12: a burst right after a restore stalled on a capture at each new
batch size). Inputs live in static buffers the runner fills before each replay. Graphs stay valid across sleep/wake
because the arena keeps its virtual addresses (bench/README.md, "Arena: graphs across sleep": a graph captured before
a sleep replayed bit-exact after three cycles).
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

DEFAULT_GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
MIN_CAPTURED_BEFORE_SERVING = 2  # of capture_order, when captures run beside the weights' load


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


def capture_order(sizes: list[int]) -> list[int]:
    """The order to capture `sizes` in when only some may be done before serving: the smallest
    (a lone stream's decode), the largest (from then on every batch has a graph to pad into),
    the largest at most a quarter of it (the burst sizes below it pad no further than that:
    on the H200, 64 streams of an 8B model padded to 256 took 8.5 ms of graph a step against
    6.4 ms at 64, bench/README.md "Bursts beside vLLM"), then halving down from the largest (a
    batch never pads past about twice its rows: an 8B decode step's GEMMs read the same weight
    bytes for 64 rows as for 128), then the rest, largest first."""
    if not sizes:
        return []
    ascending = sorted(set(sizes))
    order = [ascending[0]]
    if ascending[-1] != ascending[0]:
        order.append(ascending[-1])
    quarter = [s for s in ascending if s <= ascending[-1] // 4 and s not in order]
    if quarter:
        order.append(quarter[-1])
    last = ascending[-1]
    while True:
        below = [s for s in ascending if s <= last // 2]
        if not below:
            break
        last = below[-1]
        if last not in order:
            order.append(last)
    return order + [s for s in reversed(ascending) if s not in order]


class DecodeGraphs:
    """Captures `forward(batch_size)` (which reads the runner's static buffers and returns
    its outputs: the runner's are the logits, in a buffer outside the pool, and their argmax)
    once per size, every graph in one memory pool.

    Which sizes are captured at construction:
    - `defer_above` given: those up to it, largest first;
    - else `stop_when` given: in capture_order, until `stop_when()` returns True after a capture
      (the runner passes "the weights have landed", so capture runs in the shadow of the load
      and at most one capture outlasts it), at least the smallest and the largest (a third,
      ~0.08 s on the H200, took a warm restore of an 8B model from 1.3 to 1.6 s to its first
      token: the first capture, with every kernel's first use, takes 0.5-0.7 s of the 0.75 s load);
    - else all of them, largest first.
    The others stay pending, in capture_order: one is captured per `capture_next()` call (the
    runner's idle work). Until then a batch pads up to the smallest captured size that holds
    it, or runs eagerly when none does (padded_size only offers captured sizes)."""

    def __init__(self, forward: Callable[[int], "torch.Tensor"], sizes: list[int],
                 defer_above: int | None = None, stop_when: Callable[[], bool] | None = None):
        self._forward = forward
        self._graphs: dict = {}  # size -> (torch.cuda.CUDAGraph, output)
        self._pool = None
        self._stream = None  # the capture stream, one for all sizes
        self.all_sizes = sorted(sizes)
        self.sizes: list[int] = []  # captured, ascending
        self.capture_seconds: dict[int, float] = {}  # size -> its warm-up + capture, for the log
        order = capture_order(self.all_sizes)
        if defer_above is not None:
            for size in reversed([s for s in self.all_sizes if s <= defer_above]):
                self._capture(size)
        elif stop_when is not None:
            for i, size in enumerate(order):
                self._capture(size)
                if i >= MIN_CAPTURED_BEFORE_SERVING - 1 and stop_when():
                    break
        else:
            for size in reversed(self.all_sizes):
                self._capture(size)
        self.pending = [s for s in order if s not in self._graphs]

    def capture_next(self, size: int | None = None) -> int | None:
        """Capture `size` (default: the first size still pending), now; returns it (None: none
        was pending). The caller must have put its static buffers in a harmless state (padding
        rows) first: the warm-up forward runs on whatever they hold."""
        if size is None:
            if not self.pending:
                return None
            size = self.pending[0]
        self.pending.remove(size)
        self._capture(size)
        return size

    def worth_capturing(self, num_seqs: int) -> int | None:
        """The pending size to capture before a decode step of `num_seqs` rows, or None: the
        smallest pending size that holds them, when the captured graph they would replay has
        more than twice their rows (64 streams in the graph of 256: 8.5 ms a step against
        6.4 ms, for a capture of ~0.08 s; issue 12). Each such capture at least halves the
        padding, so a burst that rises and falls meets a handful, never one per batch size."""
        padded = self.padded_size(num_seqs)
        if padded is None or padded <= 2 * num_seqs:
            return None
        fits = [s for s in self.pending if num_seqs <= s < padded]
        return min(fits) if fits else None

    def _capture(self, size: int) -> None:
        import time

        import torch

        started = time.perf_counter()
        forward = self._forward
        current = torch.cuda.current_stream()
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        stream = self._stream
        forward(size)  # warm-up: Triton compiles, cuBLAS picks its kernels
        stream.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        # capture_begin/end rather than torch.cuda.graph(), whose entry synchronizes the whole
        # device and runs gc.collect + empty_cache: with the weights streaming in on other
        # streams during a start, that waited on their copies at every size. thread_local:
        # another thread's CUDA calls (those copies, an image write, pinning) do not
        # invalidate this capture; this thread does nothing else meanwhile.
        with torch.cuda.stream(stream):
            graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
            try:
                out = forward(size)
            finally:
                graph.capture_end()
        current.wait_stream(stream)
        self._pool = graph.pool()
        self._graphs[size] = (graph, out)
        self.sizes = sorted(self._graphs)
        current.synchronize()
        self.capture_seconds[size] = time.perf_counter() - started

    def padded_size(self, num_seqs: int) -> int | None:
        return padded_batch_size(num_seqs, self.sizes)

    def replay(self, size: int):
        graph, out = self._graphs[size]
        graph.replay()
        return out
