"""The GPU engine's CUDA-graph batch sizes (capture order, padding, deferred capture) and the
async engine's idle work between requests; none of it needs a GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dormant.engines.base import RequestOutput, SamplingParams
from dormant.engines.native.cuda.graphs import capture_order, graph_batch_sizes, padded_batch_size


def test_graph_sizes_default_up_to_max_num_seqs_and_include_it():
    assert graph_batch_sizes(None, 128) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128]
    assert graph_batch_sizes(None, 20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes([64, 1, 8, 8, 500], 128) == [1, 8, 64]
    assert graph_batch_sizes([], 128) == []


def test_padded_batch_size_picks_the_smallest_graph_that_fits():
    sizes = [1, 2, 4, 8, 16, 32]
    assert [padded_batch_size(n, sizes) for n in (1, 2, 3, 5, 8, 9, 32)] == [1, 2, 4, 8, 8, 16, 32]
    assert padded_batch_size(33, sizes) is None  # larger than any graph: eager
    assert padded_batch_size(1, []) is None


def test_capture_order_puts_batch_one_the_largest_and_its_quarter_first_then_halves():
    sizes = graph_batch_sizes(None, 256)
    assert capture_order(sizes) == [1, 256, 64, 128, 32, 16, 8, 4, 2, 192, 160, 96, 48, 24]
    assert sorted(capture_order(sizes)) == sizes
    assert capture_order(graph_batch_sizes(None, 100)) == [1, 100, 24, 48, 8, 4, 2, 96, 64, 32, 16]
    assert capture_order([1]) == [1] and capture_order([]) == []
    assert capture_order([4, 16]) == [4, 16] and capture_order([1, 2, 4]) == [1, 4, 2]


def _fake_capture(monkeypatch, captured: list):
    from dormant.engines.native.cuda import graphs as cuda_graphs

    monkeypatch.setattr(cuda_graphs.DecodeGraphs, "_capture",
                        lambda self, size: (captured.append(size), self._graphs.__setitem__(size, (None, size)),
                                            setattr(self, "sizes", sorted(self._graphs))))
    return cuda_graphs.DecodeGraphs


def test_decode_graphs_defer_the_large_sizes_and_offer_only_captured_ones(monkeypatch):
    captured = []
    DecodeGraphs = _fake_capture(monkeypatch, captured)
    g = DecodeGraphs(lambda n: None, [1, 2, 4, 8, 16, 32, 64], defer_above=8)
    assert captured == [8, 4, 2, 1] and g.sizes == [1, 2, 4, 8] and g.pending == [64, 16, 32]
    assert g.padded_size(3) == 4 and g.padded_size(9) is None  # not captured yet: eager
    assert g.capture_next() == 64 and g.padded_size(9) == 64  # padded up to the one captured
    assert g.capture_next() == 16 and g.capture_next() == 32 and g.capture_next() is None
    assert g.sizes == [1, 2, 4, 8, 16, 32, 64] and g.padded_size(9) == 16
    assert DecodeGraphs(lambda n: None, [1, 2], defer_above=8).pending == []
    assert DecodeGraphs(lambda n: None, [4, 16]).pending == []  # no deferral


def test_decode_graphs_beside_the_load_give_every_batch_a_graph(monkeypatch):
    """stop_when (the runner's "weights have landed"): in capture_order, at least batch 1 and
    the largest, so a burst right after a restore pads into a captured graph instead of
    waiting on a capture or running eagerly (issue 12); the rest wait for idle time."""
    captured = []
    DecodeGraphs = _fake_capture(monkeypatch, captured)
    landed_after = iter([False, False, True])
    g = DecodeGraphs(lambda n: None, [1, 2, 4, 8, 16, 32, 64], stop_when=lambda: next(landed_after))
    assert captured == [1, 64, 16, 32] and g.pending == [8, 4, 2]
    assert [g.padded_size(n) for n in (1, 2, 5, 17, 33, 64)] == [1, 16, 16, 32, 64, 64]
    assert g.padded_size(65) is None
    assert g.capture_next() == 8 and g.padded_size(5) == 8 and g.pending == [4, 2]
    captured.clear()
    g = DecodeGraphs(lambda n: None, [1, 2, 4, 8, 16], stop_when=lambda: True)
    assert captured == [1, 16] and g.pending == [4, 8, 2]  # landed at once: both ends all the same


def test_a_decode_step_padded_over_twice_its_rows_asks_for_the_graph_that_fits(monkeypatch):
    """worth_capturing: 64 streams right after a restore (graphs 1 and 256) ask for 64 once;
    a burst that falls from 64 to 1 asks only where the padding is over 2x, each capture at
    least halving it (issue 12)."""
    captured = []
    DecodeGraphs = _fake_capture(monkeypatch, captured)
    g = DecodeGraphs(lambda n: None, graph_batch_sizes(None, 256), stop_when=lambda: True)
    assert g.sizes == [1, 256]
    assert g.worth_capturing(200) is None and g.worth_capturing(1) is None  # padding <= 2x, or exact
    assert g.worth_capturing(64) == 64 and g.capture_next(64) == 64 and g.padded_size(64) == 64
    asked = []
    for n in range(64, 0, -1):  # the burst ends stream by stream
        size = g.worth_capturing(n)
        if size is not None:
            asked.append(g.capture_next(size))
        assert g.padded_size(n) <= max(2 * n, 1)
    assert asked == [32, 16, 8, 4] and 64 not in g.pending
    assert g.worth_capturing(100) == 128 and g.worth_capturing(129) is None


class _IdleEngine:
    """Just enough of LLMEngine for AsyncLLMEngine's loop: one request of `steps` steps."""

    def __init__(self, idle_work):
        self.model_runner = SimpleNamespace(idle_work=idle_work, sleep_levels=(1, 2), image_dir=None)
        self.steps_left = 0
        self.is_sleeping = False
        self.log: list[str] = []

    @property
    def has_unfinished(self):
        return self.steps_left > 0

    def add_request(self, request_id, prompt, params):
        self.steps_left = 3

    def step(self):
        self.log.append("step")
        self.steps_left -= 1
        done = self.steps_left == 0
        return [("r", RequestOutput([7], done, "length" if done else None))]


def test_async_engine_runs_idle_work_only_between_requests():
    import asyncio
    import time

    from dormant.engines.native.core.async_engine import AsyncLLMEngine

    units = iter([0.05, 0.0, 0.0, None])  # a wait, two units of work, then done

    def idle_work():
        engine.log.append("idle")
        return next(units, None)

    engine = _IdleEngine(idle_work)
    a = AsyncLLMEngine(engine)
    try:
        async def go():
            return [item async for item in a.generate("r", [1, 2], SamplingParams(max_tokens=3))]

        out = asyncio.run(go())
        # a consumer behind by a step or two takes the queued outputs as one
        assert [t for o in out for t in o.new_token_ids] == [7, 7, 7] and out[-1].finished
        deadline = time.monotonic() + 5
        while engine.log.count("idle") < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        log = engine.log
        first_step = log.index("step")
        assert log[first_step:first_step + 3] == ["step"] * 3  # never between a request's steps
        assert log.count("idle") == 4  # after None: not called again while nothing happens
    finally:
        a.shutdown()


def test_async_engine_drops_idle_work_that_raises():
    import time

    from dormant.engines.native.core.async_engine import AsyncLLMEngine

    calls = []

    def idle_work():
        calls.append(1)
        raise RuntimeError("boom")

    engine = _IdleEngine(idle_work)
    a = AsyncLLMEngine(engine)
    try:
        fut = a._submit(lambda: None)  # a command: the loop asks for idle work after it
        fut.result(timeout=5)
        time.sleep(0.1)
        a._submit(lambda: None).result(timeout=5)
        time.sleep(0.1)
        assert calls == [1]
    finally:
        a.shutdown()

