"""The worker speaks to its engine only through engines.base: it names no engine's modules, and
its routes answer from the engine's capabilities and stats. The engine here is a stand-in with
fewer capabilities than the native one (which has every one, so it cannot show the refusals)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest

from dormant.engines.base import Capabilities, EngineStats, StartupReport
from dormant.worker.server import WorkerState, build_app
from dormant.worker_api import Route, WorkerStats

WORKER_SOURCES = sorted((Path(__file__).resolve().parents[3] / "dormant" / "worker").rglob("*.py"))


def test_no_worker_module_names_an_engine_package():
    assert WORKER_SOURCES
    offenders = [f"{path.name}:{n}" for path in WORKER_SOURCES
                 for n, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"engines\.native", line)]
    assert not offenders, f"the worker reaches past engines.base: {offenders}"


class SleeplessEngine:
    """Sleeps at level 1 only, writes no image."""

    capabilities = Capabilities(sleep_levels=(1,), engine_image=False)

    def __init__(self) -> None:
        self.slept: list[int] = []

    async def sleep(self, level: int) -> None:
        self.slept.append(level)

    async def save_image(self) -> str | None:
        raise AssertionError("an engine without images is never asked for one")

    def stats(self) -> EngineStats:
        return EngineStats(weights_bytes=10, kv_cache_bytes=20, is_sleeping=bool(self.slept), num_running=1)

    def startup_report(self) -> StartupReport:
        return StartupReport()


@pytest.mark.timeout(30)
def test_routes_answer_from_the_engines_capabilities_and_stats():
    asyncio.run(_routes())


async def _routes():
    engine = SleeplessEngine()
    state = WorkerState(engine, tokenizer=None, model_names=["m"], max_model_len=64)
    transport = httpx.ASGITransport(app=build_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
        r = await client.post(Route.SLEEP, params={"level": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "level"
        assert "1" in r.json()["error"]["message"]
        assert (await client.post(Route.SLEEP, params={"level": 1})).status_code == 200
        assert engine.slept == [1]
        assert (await client.post(Route.HIBERNATE)).json() == {"image": None}
        stats = WorkerStats.from_dict((await client.get(Route.STATS)).json())
        assert (stats.loading, stats.weights_bytes, stats.kv_cache_bytes, stats.is_sleeping, stats.num_running) == \
            (False, 10, 20, True, 1)
        assert stats.pid > 0 and stats.rss_bytes > 0 and "phases" in stats.cold_start
