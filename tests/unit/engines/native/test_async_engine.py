"""The native engine as the worker sees it (engines.base.Engine), on the CPU with the real
SmolLM2: loaded through the registry, it answers the protocol without the worker reaching in."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dormant.engines.base import Capabilities, EngineStats, SamplingParams, StartupReport, get_engine

GREEDY = SamplingParams(temperature=0, max_tokens=6)
PROMPT = [1, 504, 3458, 282, 4649, 314]  # "The capital of France is" in SmolLM2's vocabulary


async def complete(engine, request_id: str) -> list[int]:
    ids = []
    async for output in engine.generate(request_id, PROMPT, GREEDY):
        ids.extend(output.new_token_ids)
    return ids


@pytest.mark.timeout(300)
def test_the_cpu_engine_answers_the_engine_protocol(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DORMANT_HOME", str(tmp_path))  # the engine image lands here
    loaded = get_engine("native").load(model_dir, {"device": "cpu", "dtype": "float32"})
    engine = loaded.engine
    try:
        assert engine.capabilities == Capabilities(sleep_levels=(1, 2), engine_image=True)
        report = engine.startup_report()
        assert isinstance(report, StartupReport) and report.weights_source == "safetensors"
        assert set(report.phases) == {"model_init", "weight_load"} and report.overlapped == {}

        async def scenario():
            first = await complete(engine, "a")
            stats = engine.stats()
            assert isinstance(stats, EngineStats) and stats.weights_bytes > 0 and stats.kv_cache_bytes > 0
            assert (stats.is_sleeping, stats.num_running, stats.num_waiting) == (False, 0, 0)
            image = await engine.save_image()
            assert image == stats.image_dir and any(Path(image).iterdir())
            await engine.sleep(1)
            assert engine.is_sleeping and engine.stats().is_sleeping
            await engine.wake_up()
            assert not engine.is_sleeping and engine.stats().weights_source == "image"
            return first, await complete(engine, "b")

        first, again = asyncio.run(scenario())
        assert len(first) == GREEDY.max_tokens and again == first
        assert engine.engine.model_runner.idle_work() is None  # nothing deferred on the CPU
    finally:
        engine.shutdown()


def test_a_command_whose_caller_went_away_leaves_the_engine_loop_running():
    """A cancelled await (a client disconnect) cancels the command's future; delivering its
    result must not end the engine's loop thread."""
    import concurrent.futures

    from dormant.engines.command_loop import settle as _settle

    fut: concurrent.futures.Future = concurrent.futures.Future()
    fut.cancel()
    _settle(fut, result=1)  # no InvalidStateError
    _settle(fut, exception=RuntimeError("late"))
    assert fut.cancelled()


@pytest.mark.timeout(300)
def test_steps_run_ahead_through_the_engine_protocol(model_dir, tmp_path, monkeypatch):
    """With DORMANT_RUN_AHEAD=1 (the CUDA runner's default) on the CPU: streams stopped early
    by their consumer while a step runs ahead, one left to finish, a sleep that waits for the
    step ahead, and the same tokens after the wake."""
    monkeypatch.setenv("DORMANT_HOME", str(tmp_path))
    monkeypatch.setenv("DORMANT_RUN_AHEAD", "1")
    loaded = get_engine("native").load(model_dir, {"device": "cpu", "dtype": "float32"})
    engine = loaded.engine
    long = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    try:
        assert engine.engine.model_runner.runs_ahead

        async def take(request_id: str, n: int) -> list[int]:
            ids = []
            async for output in engine.generate(request_id, PROMPT, long):
                ids.extend(output.new_token_ids)
                if len(ids) >= n:
                    break  # the consumer goes away: the engine aborts it
            return ids

        async def scenario():
            cut, whole = await asyncio.gather(take("cut", 3), take("whole", 100))
            await engine.sleep(1)  # only once nothing runs, the step ahead included
            assert engine.stats().num_running == 0 and not engine.engine.has_unfinished
            await engine.wake_up()
            return cut, whole, await take("again", 100)

        cut, whole, again = asyncio.run(scenario())
        assert len(cut) >= 3 and cut == whole[:len(cut)]
        assert len(whole) == long.max_tokens and again == whole
        assert engine.engine.scheduler.block_manager.num_free_blocks == engine.engine.scheduler.block_manager.num_blocks
    finally:
        engine.shutdown()
