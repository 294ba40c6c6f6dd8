"""checkpoint.CudaCheckpoint against real processes where the API cannot suspend them: a worker
with no CUDA process (any machine), or no cuda-bindings / no driver (here). Each is a
SuspendUnavailable that names why, and nothing is done to the processes."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from dormant.lifecycle.checkpoint import CudaCheckpoint, SuspendUnavailable, _has_gpu_open, _tree

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def parent_and_child():
    """A process with a child of its own, neither touching a GPU."""
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 20
        while not psutil.Process(proc.pid).children() and time.monotonic() < deadline:
            time.sleep(0.02)  # polling the condition: the child is up
        yield proc
    finally:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait()


def test_the_tree_holds_the_worker_and_its_children_and_none_has_a_gpu_open(parent_and_child):
    tree = _tree(parent_and_child.pid)
    assert tree[0] == parent_and_child.pid and len(tree) == 2
    assert not any(_has_gpu_open(p) for p in tree)
    assert _tree(2**22 + 1) == []  # gone: nothing


async def test_a_worker_without_a_cuda_process_cannot_be_suspended(parent_and_child):
    with pytest.raises(SuspendUnavailable) as e:
        await CudaCheckpoint().suspend(parent_and_child.pid)
    # here: no cuda-bindings or no driver; on a GPU machine: no process with a GPU open
    assert any(why in str(e.value) for why in ("cuda-bindings", "CUDA driver", "no CUDA process")), e.value
    assert psutil.Process(parent_and_child.pid).status() != psutil.STATUS_STOPPED
