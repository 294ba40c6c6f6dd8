"""The suspended tier (issue 13): the driver's checkpoint API on an asleep native worker.

    python bench/bench_suspend.py --config bench/configs/qwen3-8b.json      # GPU machine

All in one run. First a probe of the API itself, outside dormant: a CUDA process holding 1 GiB
is suspended and resumed through dormant.lifecycle.checkpoint (the driver's exact answer is
recorded where it refuses). Then through a real `dormant serve` (gateway + worker, HTTP, SSE),
a random-weight model from --config, sleep_after / suspend_after short, N cycles of:

    asleep     GPU memory held: the worker's processes (nvidia-smi per process) and the device's
    suspended  the same; the suspension's own time (the driver's calls), what moved to host RAM
    request -> first token from suspended (resume + wake + prefill), the resume's own time
    request -> first token from asleep (wake + prefill): the anchor

The standby worker is off (its CUDA context would blur the device's figure). Where the gateway
skips the tier, /running says why (`suspend_skipped`): recorded, and the asleep figures still
are. JSON to bench/results/suspend/latest.json (or --out), rewritten after each part.

A dry run of the whole path on a CPU machine (the tier is skipped there: no API):
    python bench/bench_suspend.py --device cpu --source builtin:smollm2 --out /tmp/suspend.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from gateway_process import free_port, wait_healthy
from report import no_anchor, print_figures, result_path, vs_anchor, write

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROBE_CHILD = r"""
import sys, torch
device_mib, pinned_gib, graphs = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
x = torch.arange(device_mib * 2**18, device="cuda", dtype=torch.int32)
probe = x[::997].to(torch.int64).sum().item()
host = torch.empty(int(pinned_gib * 2**30), dtype=torch.uint8, pin_memory=True) if pinned_gib else None
kept = []
if graphs:  # graphs of 20 small kernels each (vLLM's piecewise graphs: a few kernels per piece)
    y = torch.zeros(1024, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(graphs):
            g = torch.cuda.CUDAGraph()
            g.capture_begin()
            for _ in range(20):
                y.add_(1)
            g.capture_end()
            kept.append(g)
torch.cuda.synchronize()
print("ready", flush=True)
for line in sys.stdin:
    if kept:
        kept[0].replay()
    print("ok" if x[::997].to(torch.int64).sum().item() == probe else "bad", flush=True)
"""

# (name, device MiB, pinned host GiB, CUDA graphs): where a resume's time goes, per byte, per
# pinned byte, per graph (an asleep 8B native worker: 0.8 GiB on the device, 16.4 GB pinned
# host backup; vLLM's engine core: ~1.8 GiB, its pinned weights backup, thousands of graphs)
PROBE_VARIANTS = (
    ("1 GiB", 1024, 0, 0),
    ("16 GiB", 16384, 0, 0),
    ("1 GiB + 16 GiB pinned host", 1024, 16, 0),
    ("1 GiB + 2,500 graphs", 1024, 0, 2500),
)


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def device_used() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return int(out.strip().splitlines()[0]) << 20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def process_gpu_bytes(pids: set[int]) -> int | None:
    """nvidia-smi's per-process figure summed over `pids`: 0 where it lists none of them
    (suspended, or a sandbox whose pids nvidia-smi does not see: the asleep figure tells which)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
        rows = [line.split(",") for line in out.strip().splitlines() if "," in line]
        used = [int(mib) << 20 for pid, mib in rows if int(pid) in pids]
        return sum(used)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def worker_pids(root: int) -> set[int]:
    import psutil

    try:
        return {root, *(c.pid for c in psutil.Process(root).children(recursive=True))}
    except psutil.Error:
        return {root}


# ---- the API alone ---------------------------------------------------------------------------


def probe_api(variant: tuple = PROBE_VARIANTS[0]) -> dict:
    """Suspend and resume a plain CUDA process (device MiB, pinned host GiB, CUDA graphs of
    `variant`); the driver's answer if it refuses."""
    from dormant.lifecycle.checkpoint import CudaCheckpoint, SuspendFailed, SuspendUnavailable

    name, *sizes = variant
    out: dict = {"variant": name}
    child = subprocess.Popen([sys.executable, "-c", PROBE_CHILD, *map(str, sizes)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        if child.stdout.readline().strip() != "ready":
            return {**out, "error": "the probe process did not start"}
        cp = CudaCheckpoint()
        before = device_used()
        try:
            s = asyncio.run(cp.suspend(child.pid))
        except (SuspendUnavailable, SuspendFailed) as e:
            return {**out, "refused": f"{type(e).__name__}: {e}"}
        during = device_used()
        out.update(suspend_s=s.seconds, host_bytes=s.host_bytes, device_used_running=before,
                   device_used_suspended=during)
        out["resume_s"] = asyncio.run(cp.resume(s))
        child.stdin.write("check\n")
        child.stdin.flush()
        out["intact_after_resume"] = child.stdout.readline().strip() == "ok"
        log(f"API probe, {name}: suspended in {s.seconds:.3f} s, resumed in {out['resume_s']:.3f} s, "
            f"intact: {out['intact_after_resume']}")
    finally:
        child.kill()
        child.wait()
    return out


# ---- through the gateway ---------------------------------------------------------------------


def first_token(base: str) -> float:
    body = {"model": "m", "prompt": "t1 t2 t3 t4", "max_tokens": 1, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and '"text"' in line:
                return time.perf_counter() - t0
    raise RuntimeError("no token")


def replica(base: str) -> dict:
    return httpx.get(f"{base}/running", timeout=10).json()["running"][0]


class SuspendFailed(RuntimeError):
    pass


def wait_state(base: str, state: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = replica(base)
        if r["state"] == state or (state == "suspended" and r["suspend_skipped"]):
            return r
        if state == "asleep" and r["state"] in ("suspending", "suspended"):
            raise TimeoutError(f"asleep for too short a time to be seen (--suspend-after is measured from the "
                               f"last request; the sleep took longer than the gap): {r['state']}")
        if state == "suspended" and r["state"] in ("stopping", "stopped", "cold"):
            raise SuspendFailed(f"the worker was stopped instead: {r['state']}")
        time.sleep(0.02)
    raise TimeoutError(f"never {state}: {replica(base)}")


def metric_sum(base: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{re.escape(name)}{{{re.escape(want)}}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def memory(base: str, baseline: int | None) -> dict:
    r = replica(base)
    used = device_used()
    return {"worker_processes_bytes": process_gpu_bytes(worker_pids(r["pid"])) if r["pid"] else None,
            "device_used_above_baseline_bytes": used - baseline if used is not None and baseline is not None else None,
            "running_gpu_bytes": r["gpu_bytes"], "running_host_bytes": r["host_bytes"]}


def through_gateway(model_dir: Path, device: str, work: Path, cycles: int, sleep_after: float,
                    suspend_after: float, result: dict, out: Path) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cfg = work / "dormant.yaml"
    cfg.write_text(json.dumps({"port": port, "store": str(work / "home"), "standby_worker": False, "models": {"m": {
        "source": str(model_dir), "engine_args": {"device": device}, "sleep_after": f"{sleep_after}s",
        "suspend_after": f"{suspend_after}s", "hibernate_after": -1, "stop_after": -1, "start_timeout": "600s"}}}))
    baseline = device_used()
    logf = open(work / "gateway.log", "w")
    gw = subprocess.Popen([sys.executable, "-m", "dormant.cli", "serve", "--config", str(cfg)], cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=logf, stderr=subprocess.STDOUT,
                          start_new_session=True)
    ours: dict = {"device_used_baseline_bytes": baseline, "cycles": []}
    result["ours"] = ours
    try:
        wait_healthy(base, gw, timeout=60)
        t = time.perf_counter()
        ours["cold_start_to_first_token_s"] = first_token(base)
        log(f"cold start -> first token {ours['cold_start_to_first_token_s']:.1f} s")
        for i in range(cycles):
            c: dict = {}
            wait_state(base, "asleep")
            time.sleep(0.5)  # the sleep's copies and frees settle before the figure (nvidia-smi lags)
            c["asleep"] = memory(base, baseline)
            try:
                r = wait_state(base, "suspended", timeout=suspend_after + 300)
            except SuspendFailed as e:
                logf.flush()
                lines = (work / "gateway.log").read_text().splitlines()
                ours["suspend_failed"] = [str(e), *[ln for ln in lines if "suspend" in ln][-5:]]
                log(f"the suspension failed: {ours['suspend_failed']}")
                break
            if r["suspend_skipped"]:
                ours["suspend_skipped"] = r["suspend_skipped"]
                log(f"the suspend tier was skipped: {r['suspend_skipped']}")
                c["ttft_from_asleep_s"] = first_token(base)
                ours["cycles"].append(c)
                write(out, result)
                break
            time.sleep(0.5)
            c["suspended"] = memory(base, baseline)
            c["suspend_s"], c["moved_to_host_bytes"] = r["suspension"]["suspend_seconds"], r["suspension"]["host_bytes"]
            c["suspended_pids"] = r["suspension"]["pids"]
            resumed = metric_sum(base, "dormant:checkpoint_seconds_sum", model="m", op="resume")
            c["ttft_from_suspended_s"] = first_token(base)
            c["resume_s"] = metric_sum(base, "dormant:checkpoint_seconds_sum", model="m", op="resume") - resumed
            wait_state(base, "asleep")
            c["ttft_from_asleep_s"] = first_token(base)
            ours["cycles"].append(c)
            write(out, result)
            log(f"cycle {i}: suspend {c['suspend_s']:.2f} s, resume {c['resume_s']:.2f} s; first token from "
                f"suspended {c['ttft_from_suspended_s']:.3f} s, from asleep {c['ttft_from_asleep_s']:.3f} s; GPU "
                f"asleep {c['asleep']}, suspended {c['suspended']}")
        ours["wall_s"] = time.perf_counter() - t
    finally:
        os.killpg(gw.pid, signal.SIGTERM)
        try:
            gw.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(gw.pid, signal.SIGKILL)
        logf.close()
    return ours


def median(cycles: list[dict], *path: str) -> float | None:
    values = []
    for c in cycles:
        v = c
        for key in path:
            v = v.get(key) if isinstance(v, dict) else None
        if isinstance(v, (int, float)):
            values.append(v)
    return statistics.median(values) if values else None


def figures(ours: dict) -> dict:
    cycles = ours.get("cycles", [])
    gib = lambda v: v / 2**30 if v is not None else None  # noqa: E731
    # nvidia-smi's per-process figure where it sees the worker's pids (asleep > 0), else the device's
    figure = "worker_processes_bytes" if median(cycles, "asleep", "worker_processes_bytes") else \
        "device_used_above_baseline_bytes"
    asleep_gpu, suspended_gpu = median(cycles, "asleep", figure), median(cycles, "suspended", figure)
    return {
        "request -> first token from suspended, s": vs_anchor(
            median(cycles, "ttft_from_suspended_s"), "request -> first token from asleep, s",
            median(cycles, "ttft_from_asleep_s"), higher_is_better=False, goal="<= 2 s"),
        "GPU memory held suspended, GiB": vs_anchor(
            gib(suspended_gpu), "GPU memory held asleep, GiB", gib(asleep_gpu), higher_is_better=False,
            goal="0 GiB"),
        "suspend (driver calls), s": no_anchor(median(cycles, "suspend_s")),
        "resume (driver calls), s": no_anchor(median(cycles, "resume_s")),
    }


def machine() -> str:
    import platform

    import torch

    gpu = f"{torch.cuda.get_device_name()}, " if torch.cuda.is_available() else ""
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        driver = "?"
    return f"{gpu}driver {driver}, {os.cpu_count()} CPU cores, {platform.platform()}; torch {torch.__version__}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "bench/configs/qwen3-8b.json"), help="HF config.json of the model")
    p.add_argument("--source", help="an existing model instead (builtin:smollm2, a folder): a dry run")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "dormant-bench-suspend"))
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--sleep-after", type=float, default=2.0)
    p.add_argument("--suspend-after", type=float, default=20.0,
                   help="seconds idle; the asleep figures come before (the H200's first sleep of the 8B shape took 10.5 s)")
    p.add_argument("--probe-variants", action="store_true",
                   help="also probe the API on processes holding 16 GiB, 16 GiB of pinned host memory, 2,500 graphs")
    p.add_argument("--probe-only", action="store_true", help="the API probes only, not through dormant")
    p.add_argument("--out", help="JSON path (default bench/results/suspend/latest.json)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")  # the driver steps' times
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    out = result_path("suspend", args.out)
    result: dict = {"date": datetime.date.today().isoformat(), "command": " ".join(["python3", *sys.argv]),
                    "machine": machine(), "config": args.config, "sleep_after_s": args.sleep_after,
                    "suspend_after_s": args.suspend_after}
    result["api_probe"] = probe_api()
    write(out, result)
    if args.probe_variants:
        result["api_probe_variants"] = [probe_api(v) for v in PROBE_VARIANTS[1:]]
        write(out, result)
    if args.probe_only:
        print(json.dumps(result, indent=2))
        return
    t = time.perf_counter()
    if args.source:
        from dormant.store.models import materialize

        model_dir = materialize(args.source)
    else:
        from random_model import make_random_model  # same folder

        model_dir = make_random_model(args.config, work / Path(args.config).stem, device=args.device)
    result["model_dir"], result["model_made_s"] = str(model_dir), time.perf_counter() - t
    through_gateway(model_dir, args.device, work, args.cycles, args.sleep_after, args.suspend_after, result, out)
    result["figures"] = figures(result["ours"])
    write(out, result)
    print(json.dumps({k: result[k] for k in ("api_probe", "ours")}, indent=2))
    print_figures(result["figures"])
    print(f"wrote {out}; the gateway's log: {work / 'gateway.log'}")


if __name__ == "__main__":
    main()
