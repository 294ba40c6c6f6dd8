"""The suspended tier on a real GPU: the driver's checkpoint API through lifecycle/checkpoint.py,
first on a plain CUDA process (its memory, a CUDA graph and a kernel launch after the restore),
then on a native worker under a real gateway (asleep -> suspended -> a request answers as
before, 0 GPU bytes held meanwhile).

Where the driver refuses the API (a sandbox, an older driver), each test skips and its reason
is the driver's own answer (`pytest -rs` prints it): that answer is a finding, not a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dormant.lifecycle.checkpoint import CudaCheckpoint, SuspendUnavailable

ROOT = Path(__file__).resolve().parents[2]
GiB = 2**30

CHILD = r"""
import sys, torch
n = 256 * 2**20  # 1 GiB of int32
x = torch.arange(n, device="cuda", dtype=torch.int32)
probe = x[::997].to(torch.int64).sum().item()
static = torch.zeros(1024, device="cuda", dtype=torch.int32)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    static.copy_(x[:1024] * 3)
torch.cuda.synchronize()
print("ready", flush=True)
for line in sys.stdin:
    static.zero_()
    graph.replay()
    y = x[:1024] * 2  # a kernel launched after the restore
    ok = (x[::997].to(torch.int64).sum().item() == probe and int(x[-1]) == n - 1
          and torch.equal(static, torch.arange(1024, device="cuda", dtype=torch.int32) * 3)
          and torch.equal(y, torch.arange(1024, device="cuda", dtype=torch.int32) * 2))
    print("ok" if ok else "bad", flush=True)
"""


def device_used_bytes() -> int:
    """Memory in use on GPU 0, every process's (nvidia-smi)."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return int(out.strip().splitlines()[0]) << 20


def wait_until(condition, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout:.0f} s")
        time.sleep(interval)


@pytest.mark.timeout(180)
def test_a_cuda_process_is_suspended_to_zero_gpu_bytes_and_resumes_intact():
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        suspender = CudaCheckpoint()
        running = device_used_bytes()
        try:
            suspension = asyncio.run(suspender.suspend(child.pid))
        except SuspendUnavailable as e:
            pytest.skip(f"the driver's checkpoint API refused: {e}")
        suspended = device_used_bytes()
        assert suspension.pids == (child.pid,)
        assert running - suspended >= GiB, (running, suspended)  # the tensor and the context left the GPU
        assert suspension.host_bytes >= GiB  # ...into the process's host memory
        seconds = asyncio.run(suspender.resume(suspension))
        assert device_used_bytes() - suspended >= GiB
        child.stdin.write("check\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "ok"
        print(f"suspend {suspension.seconds:.2f} s, resume {seconds:.2f} s, "
              f"{(running - suspended) / GiB:.2f} GiB off the GPU")
    finally:
        child.kill()
        child.wait()


PARENT = r"""
import subprocess, sys
children = [subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True) for _ in range(2)]
assert all(c.stdout.readline().strip() == "ready" for c in children)
print("ready", flush=True)
for line in sys.stdin:
    for c in children:
        c.stdin.write(line)
        c.stdin.flush()
    print("ok" if all(c.stdout.readline().strip() == "ok" for c in children) else "bad", flush=True)
"""


@pytest.mark.timeout(240)
def test_two_cuda_processes_of_one_worker_are_suspended_and_resumed_together():
    """vLLM's shape (a parent without CUDA, two CUDA processes under it), each step one process
    after the other and then all at once: both come back intact, and the times say what running
    the driver's calls on one thread per process gains (issue 13: vLLM's resume took 1.70 s)."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        assert parent.stdout.readline().strip() == "ready"
        times = {}
        for parallel in (False, True, False, True):
            suspender = CudaCheckpoint(parallel=parallel)
            try:
                suspension = asyncio.run(suspender.suspend(parent.pid))
            except SuspendUnavailable as e:
                pytest.skip(f"the driver's checkpoint API refused: {e}")
            assert len(suspension.pids) == 2 and parent.pid not in suspension.pids
            resumed = asyncio.run(suspender.resume(suspension))
            parent.stdin.write("check\n")
            parent.stdin.flush()
            assert parent.stdout.readline().strip() == "ok"
            times.setdefault("parallel" if parallel else "serial", []).append((suspension.seconds, resumed))
        print("two CUDA processes (1 GiB each): " + "; ".join(
            f"{mode}: " + ", ".join(f"suspend {s:.2f} s resume {r:.2f} s" for s, r in runs)
            for mode, runs in times.items()))
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()


# ---- a native worker under the gateway ------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "bench"))
    from random_model import make_random_model

    return make_random_model(ROOT / "bench/configs/qwen3-0.6b.json", tmp_path_factory.mktemp("qwen3-0.6b"))


@pytest.fixture
def gateway(small_model, tmp_path):
    port = _free_port()
    cfg = tmp_path / "dormant.yaml"
    # no standby worker: its CUDA context, forked anew after a start, would blur the device figures;
    # a KV size of its own: sized from free memory, it found what earlier tests in this process hold
    cfg.write_text(json.dumps({"port": port, "store": str(tmp_path / "home"), "standby_worker": False,
                               "models": {"m": {"source": str(small_model), "engine_args": {"device": "cuda", "kv_cache_tokens": 8192},
                                                "sleep_after": "1s", "suspend_after": "4s", "hibernate_after": -1,
                                                "stop_after": -1, "start_timeout": "300s"}}}))
    log = open(tmp_path / "gateway.log", "w")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-m", "dormant.gateway", "--config", str(cfg)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": path}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _healthy(base, proc), 60, "gateway /health")
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        print((tmp_path / "gateway.log").read_text()[-4000:])


def _healthy(base: str, proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"the gateway exited with {proc.returncode}")
    try:
        return httpx.get(base + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _complete(base: str) -> str:
    body = {"model": "m", "prompt": "t11 t12 t13 t14 t15", "max_tokens": 16, "temperature": 0}
    r = httpx.post(base + "/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def _replica(base: str) -> dict:
    return httpx.get(base + "/running", timeout=10).json()["running"][0]


def _in_state(base: str, *states: str) -> dict | None:
    """The replica's /running entry once it is in one of `states` or its suspend tier was skipped."""
    r = _replica(base)
    return r if r["state"] in states or r["suspend_skipped"] else None


@pytest.mark.timeout(600)
def test_a_native_worker_is_suspended_after_sleep_and_a_request_resumes_it(gateway):
    first = _complete(gateway)
    asleep = wait_until(lambda: _in_state(gateway, "asleep"), 60, "asleep")
    used_asleep = device_used_bytes()
    r = wait_until(lambda: _in_state(gateway, "suspended"), 60, "suspended, or the tier skipped")
    if r["suspend_skipped"]:
        pytest.skip(f"the driver's checkpoint API refused: {r['suspend_skipped']}")
    used_suspended = device_used_bytes()
    assert r["pid"] == asleep["pid"] and r["gpu_bytes"] == 0 and r["tier"] == "suspended"
    assert asleep["pid"] in r["suspension"]["pids"]
    # what the asleep worker held (its context, graphs, what the arena leaves) is off the GPU
    assert used_asleep - used_suspended >= 256 * 2**20, (used_asleep, used_suspended)
    t = time.monotonic()
    assert _complete(gateway) == first  # same greedy tokens: its weights and graphs came back intact
    seconds = time.monotonic() - t
    after = _replica(gateway)
    assert after["state"] == "ready" and after["pid"] == asleep["pid"]
    metrics = httpx.get(gateway + "/metrics", timeout=10).text
    assert 'dormant:checkpoint_seconds_count{model="m",op="resume"} 1' in metrics
    print(f"asleep {used_asleep / GiB:.2f} GiB on the device, suspended {used_suspended / GiB:.2f} GiB; "
          f"request from suspended -> answer {seconds:.2f} s; suspend {r['suspension']['suspend_seconds']:.2f} s")
