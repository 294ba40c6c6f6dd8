"""`dormant profile MODEL`: a full cold start and a restore from the engine image, each in a
fresh worker process, and the phases each worker reports of its own start (worker/profile.py
keeps that clock; worker_api.COLD_START_PHASES names the phases).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from typing import Any

from dormant.worker_api import COLD_START_PHASES as PHASES
from dormant.worker_api import TOKEN_ENV, LaunchSpec, Route, new_token


def format_table(runs: dict[str, dict[str, Any]]) -> str:
    """One column per path: seconds and share of that path's total."""
    names = list(runs)
    lines = [f"{'phase':<15}" + "".join(f"{n:>22}" for n in names)]
    for phase in (*PHASES, "other"):
        cells = []
        for n in names:
            run = runs[n]
            s = run["phases"].get(phase)
            cells.append(f"{'-':>22}" if s is None else f"{s:>11.3f} s {100 * s / run['total']:>6.1f} %")
        if any(c.strip() != "-" for c in cells):
            lines.append(f"{phase:<15}" + "".join(cells))
    lines.append(f"{'total':<15}" + "".join(f"{runs[n]['total']:>11.3f} s {100.0:>6.1f} %" for n in names))
    lines.append(f"{'weights from':<15}" + "".join(f"{str(runs[n]['weights_source']):>22}" for n in names))
    overlapped = sorted({p for n in names for p in runs[n].get("overlapped", {})})
    for phase in overlapped:  # what ran beside other phases, by its own clock
        cells = [runs[n].get("overlapped", {}).get(phase) for n in names]
        lines.append(f"{phase + ' (all)':<15}" + "".join(f"{'-':>22}" if c is None else f"{c:>11.3f} s {'beside':>8}"
                                                       for c in cells))
    return "\n".join(lines)


def run_profile(source: str, engine_args: dict[str, Any] | None = None, timeout: float = 600,
                engine: str = "native") -> dict[str, Any]:
    """A full cold start (image deleted first) and a restore, each in a fresh worker process."""
    from dormant.engines.base import get_engine
    from dormant.store.images import EngineImage
    from dormant.store.models import materialize

    model_dir = materialize(source)
    image_dir = get_engine(engine).image_dir(model_dir, engine_args or {})
    if image_dir is not None:
        EngineImage(image_dir).delete()
    spec = LaunchSpec(source=source, model_id="profile", port=0, engine=engine, engine_args=engine_args or {})
    cold = _one_start(spec, timeout, write_image=True)
    restore = _one_start(spec, timeout, write_image=False)
    return {"model": source, "model_dir": str(model_dir), "cold": cold, "restore": restore}


def _one_start(spec: LaunchSpec, timeout: float, *, write_image: bool) -> dict[str, Any]:
    import httpx

    from dormant._proc import free_port

    spec = dataclasses.replace(spec, port=free_port())
    token = new_token()  # the worker answers only us, as it does the gateway
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "dormant.worker", *spec.to_argv()], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, TOKEN_ENV: token})
    base = spec.base_url
    try:
        with httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {token}"}) as client:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
                try:
                    if client.get(base + Route.HEALTH, timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("worker not healthy in time")
                time.sleep(0.02)
            body = {"model": "profile", "prompt": "Hello", "max_tokens": 1, "temperature": 0, "stream": True}
            with client.stream("POST", base + Route.COMPLETIONS, json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data:") and '"text"' in line:
                        break
            total = time.time() - started
            report = client.get(base + Route.STATS).json()["cold_start"]
            if write_image:  # wait for the image the next start restores from
                client.post(base + Route.HIBERNATE, timeout=timeout)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    phases = dict(report["phases"])
    phases["other"] = max(0.0, total - sum(phases.values()))  # spawn, HTTP, polling
    return {"total": total, "phases": phases, "overlapped": report.get("overlapped", {}),
            "weights_source": report["weights_source"], "pid": proc.pid}
