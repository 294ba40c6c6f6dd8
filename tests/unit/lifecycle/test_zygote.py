"""The zygote for real: a worker it forks reports how it ended, through the zygote that reaped it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import httpx
import pytest

from dormant._proc import free_port
from dormant.lifecycle.zygote import ZygoteClient

REPO = Path(__file__).resolve().parents[3]


def worker_args(source: str, port: int = 0) -> list[str]:
    return ["--source", source, "--model-id", "m", "--host", "127.0.0.1", "--port", str(port or free_port()),
            "--engine", "native", "--engine-args", json.dumps({"device": "cpu"})]


async def _fork_and_watch(tmp_path: Path, standby: str = "off") -> tuple[int, int]:
    zygote = ZygoteClient({"PYTHONPATH": str(REPO), "DORMANT_HOME": str(tmp_path)}, standby=standby, standby_delay=0,
                          standby_sources=["builtin:smollm2", str(tmp_path / "no-such-model")])
    zygote.start()
    try:
        while not zygote.is_ready:  # it imports torch and transformers first (seconds on 2 cores)
            assert not (zygote._starting.done() and not zygote.is_ready), "the zygote did not come up (see its stderr)"
            await asyncio.sleep(0.05)
        env = {**os.environ, "DORMANT_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
        # a model that does not exist: the worker exits with 2 once it has looked
        pid, exited = await zygote.fork(worker_args(str(tmp_path / "no-such-model")), env)
        missing = await asyncio.wait_for(exited, 120)
        # a worker killed while its model loads (its /health says 503 until then): -9, as
        # subprocess reports a SIGKILL
        port = free_port()
        pid, exited = await zygote.fork(worker_args("builtin:smollm2", port), env)
        async with httpx.AsyncClient() as client:
            while True:
                try:
                    if (await client.get(f"http://127.0.0.1:{port}/health")).status_code == 503:
                        break
                except httpx.TransportError:
                    pass
                assert not exited.done(), f"the worker ended first, with {exited.result()}"
                await asyncio.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
        killed = await asyncio.wait_for(exited, 60)
        return missing, killed
    finally:
        await zygote.stop()


@pytest.mark.timeout(240)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the zygote forks and uses Linux signals")
def test_forked_workers_report_their_exit_codes(tmp_path):
    assert asyncio.run(_fork_and_watch(tmp_path)) == (2, -signal.SIGKILL)


@pytest.mark.timeout(240)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the zygote forks and uses Linux signals")
def test_workers_taken_from_the_standby_run_and_report_their_exit_codes(tmp_path, capfd):
    """worker/standby.py on the CPU ("always"): each request takes the worker forked ahead
    (its line says so), and the next finds the replacement the zygote forked meanwhile."""
    assert asyncio.run(_fork_and_watch(tmp_path, standby="always")) == (2, -signal.SIGKILL)
    claimed = [line for line in capfd.readouterr().err.splitlines() if "dormant standby pid" in line]
    assert len(claimed) == 2 and len({line.split()[3] for line in claimed}) == 2, claimed


async def _kill_and_restart(tmp_path: Path) -> tuple[int, int, int]:
    zygote = ZygoteClient({"PYTHONPATH": str(REPO), "DORMANT_HOME": str(tmp_path)})
    zygote.start()
    try:
        await asyncio.wait_for(zygote._starting, 120)
        first = zygote.pid
        assert zygote.is_ready and first, "the zygote did not come up (see its stderr)"
        os.kill(first, signal.SIGKILL)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while not (zygote.is_ready and zygote.pid not in (None, first)):  # a new one imports torch again
            assert loop.time() < deadline, "no new zygote after the first was killed"
            await asyncio.sleep(0.05)
        env = {**os.environ, "DORMANT_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
        _, exited = await zygote.fork(worker_args(str(tmp_path / "no-such-model")), env)
        return first, zygote.pid, await asyncio.wait_for(exited, 120)
    finally:
        await zygote.stop()


@pytest.mark.timeout(300)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the zygote forks and uses Linux signals")
def test_a_killed_zygote_is_restarted_and_forks_again(tmp_path, caplog):
    """Issue 15, item 8: the death is logged, a new zygote comes up, and it forks workers."""
    caplog.set_level("WARNING", logger="dormant.lifecycle")
    first, second, code = asyncio.run(_kill_and_restart(tmp_path))
    assert second != first and code == 2
    assert f"zygote pid {first} exited (code -9)" in caplog.text
