"""checkpoint.CudaCheckpoint's order of driver calls for a worker of several CUDA processes (vLLM:
API server and engine core), against a fake driver module: the real one needs an NVIDIA driver
(tests/gpu/test_suspend_gpu.py runs it). Within a step the processes go at once; the steps keep
the driver's order (all locked before any checkpoint, all restored before any unlock); a refusal
part-way puts every process back."""

from __future__ import annotations

import threading

import pytest

from dormant.lifecycle import checkpoint
from dormant.lifecycle.checkpoint import CudaCheckpoint, SuspendFailed, SuspendUnavailable

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]
ROOT = 1000
PIDS = (ROOT, ROOT + 1, ROOT + 2)
SUCCESS, ILLEGAL_STATE = 0, 401


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeDriver:
    """cuda.bindings.driver's checkpoint calls, recorded. With `together`, each call of a step
    waits until every process's call of that step has begun: a step that runs one process at a
    time breaks the barrier (and the test) instead of passing slowly."""

    class CUresult:
        CUDA_SUCCESS = SUCCESS

    class CUprocessState:
        CU_PROCESS_STATE_RUNNING = 0

    class CUcheckpointLockArgs:
        timeoutMs = 0

    def __init__(self, together: bool = True, refuse: tuple[str, int] | None = None) -> None:
        self.events: list[tuple[str, str, int]] = []  # (begin|end, call, pid)
        self.refuse = refuse
        self._mutex = threading.Lock()
        self._barriers = {name: threading.Barrier(len(PIDS), timeout=5) for name in
                          ("Lock", "Checkpoint", "Restore", "Unlock")} if together else {}
        self.state = dict.fromkeys(PIDS, "running")

    def cuGetErrorName(self, err):
        return SUCCESS, b"CUDA_ERROR_ILLEGAL_STATE"

    def cuCheckpointProcessGetState(self, pid):
        return SUCCESS, 0

    def _step(self, name: str, pid: int, after: str) -> tuple[int]:
        with self._mutex:
            self.events.append(("begin", name, pid))
        if name in self._barriers and self.refuse is None:
            self._barriers[name].wait()
        refused = self.refuse == (name, pid)
        with self._mutex:
            self.events.append(("end", name, pid))
            if not refused:
                self.state[pid] = after
        return (ILLEGAL_STATE if refused else SUCCESS,)

    def cuCheckpointProcessLock(self, pid, args):
        assert args.timeoutMs == checkpoint.LOCK_TIMEOUT_MS
        return self._step("Lock", pid, "locked")

    def cuCheckpointProcessCheckpoint(self, pid, args):
        return self._step("Checkpoint", pid, "checkpointed")

    def cuCheckpointProcessRestore(self, pid, args):
        return self._step("Restore", pid, "locked")

    def cuCheckpointProcessUnlock(self, pid, args):
        return self._step("Unlock", pid, "running")

    def calls(self, name: str) -> list[int]:
        return [pid for kind, call, pid in self.events if kind == "begin" and call == name]

    def index(self, kind: str, name: str, pick) -> int:
        return pick(i for i, (k, call, _) in enumerate(self.events) if k == kind and call == name)


@pytest.fixture
def worker(monkeypatch):
    """A worker of three CUDA processes, as far as CudaCheckpoint can tell."""
    monkeypatch.setattr(checkpoint, "_tree", lambda root: list(PIDS) if root == ROOT else [])
    monkeypatch.setattr(checkpoint, "_has_gpu_open", lambda pid: True)
    monkeypatch.setattr(checkpoint, "_rss", lambda pids: 0)


def suspender_with(driver: FakeDriver, parallel: bool = True) -> CudaCheckpoint:
    suspender = CudaCheckpoint(parallel=parallel)
    suspender._driver = driver
    return suspender


def step_before(driver: FakeDriver, first: str, then: str) -> bool:
    """Every call of step `first` ended before any call of step `then` began."""
    return driver.index("end", first, max) < driver.index("begin", then, min)


async def test_processes_are_checkpointed_at_once_and_every_one_is_locked_first(worker):
    driver = FakeDriver(together=True)
    suspension = await suspender_with(driver).suspend(ROOT)
    assert suspension.pids == PIDS
    assert sorted(driver.calls("Lock")) == sorted(driver.calls("Checkpoint")) == list(PIDS)
    assert step_before(driver, "Lock", "Checkpoint")
    assert set(driver.state.values()) == {"checkpointed"}


async def test_processes_are_restored_at_once_and_none_is_unlocked_before_all_are_restored(worker):
    driver = FakeDriver(together=True)
    suspender = suspender_with(driver)
    suspension = await suspender.suspend(ROOT)
    driver.events.clear()
    await suspender.resume(suspension)
    assert sorted(driver.calls("Restore")) == sorted(driver.calls("Unlock")) == list(PIDS)
    assert step_before(driver, "Restore", "Unlock")
    assert set(driver.state.values()) == {"running"}


async def test_one_after_the_other_when_not_parallel(worker):
    driver = FakeDriver(together=False)
    suspender = suspender_with(driver, parallel=False)
    await suspender.resume(await suspender.suspend(ROOT))
    # each call ends before the next begins, in the order of the worker's tree
    assert [e[0] for e in driver.events] == ["begin", "end"] * (4 * len(PIDS))
    assert driver.calls("Restore") == list(PIDS)


@pytest.mark.parametrize("step", ["Lock", "Checkpoint"])
async def test_a_refusal_part_way_puts_every_process_back(worker, step):
    driver = FakeDriver(together=False, refuse=(step, ROOT + 1))
    with pytest.raises(SuspendUnavailable, match=f"cuCheckpointProcess{step}\\({ROOT + 1}\\) answered"):
        await suspender_with(driver).suspend(ROOT)
    assert set(driver.state.values()) == {"running"}  # restored where checkpointed, then unlocked
    if step == "Lock":
        assert driver.calls("Checkpoint") == []  # no checkpoint unless every process is locked


async def test_a_refused_restore_is_a_failed_resume(worker):
    driver = FakeDriver(together=False)
    suspender = suspender_with(driver)
    suspension = await suspender.suspend(ROOT)
    driver.refuse = ("Restore", ROOT + 2)
    with pytest.raises(SuspendFailed, match="resume failed"):
        await suspender.resume(suspension)
    assert driver.calls("Unlock") == []  # none runs on while another's GPU state is not back
