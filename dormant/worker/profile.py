"""Cold-start phases: what a worker measures about its own start, and `dormant profile`.

A worker records, in order (seconds each; a phase that did not happen is absent):

    process_start   process creation -> worker main (interpreter start; ~0 for a zygote fork)
    import          torch, transformers and the engine imported
    cuda_context    first CUDA context (GPU)
    model_init      config, tokenizer, the model built on the meta device, arena allocated
    weight_load     arena filled: from the engine image (weights_source "image") or the
                    model's safetensors ("safetensors")
    compile         torch.compile / Inductor (when the engine compiles)
    graph_capture   CUDA graphs (GPU)
    warm_up         one short generation before /health answers
    server_start    the HTTP server up
    first_token     the first request's arrival -> its first token

The phases are the start's critical path and add up to it. Work that ran beside another phase
is counted where the start waited for it: on the GPU the weights stream in while the decode
graphs are captured, so weight_load is only what capture did not hide, and `overlapped` gives
the weight load's own time; the CUDA context is created from the worker's first moment, beside
its HTTP server, the model's config and the tokenizer, so cuda_context is what the engine
still waited for it.

It reports them in `GET /stats` under `cold_start`; the gateway exports them as the histogram
`dormant:cold_start_phase_seconds{model,phase,path}` (path: "cold" or "image").
`run_profile` (the `dormant profile MODEL` command) starts a worker in a fresh process twice:
a full cold start with no image, then a restore from the image the first one wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

PHASES = ("process_start", "import", "cuda_context", "model_init", "weight_load", "compile",
          "graph_capture", "warm_up", "server_start", "first_token")


def path_of(weights_source: str | None) -> str:
    return "image" if weights_source == "image" else "cold"


class StartupProfile:
    """The worker's phase clock: `lap(phase)` closes a phase at now."""

    def __init__(self, started_at: float) -> None:
        self.phases: dict[str, float] = {}
        self.overlapped: dict[str, float] = {}  # phase -> its own seconds, where it ran beside others
        self.weights_source: str | None = None
        self._last = started_at

    def lap(self, phase: str) -> float:
        now = time.time()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
        self._last = now
        return self.phases[phase]

    def add(self, phases: dict[str, float], inside: str) -> None:
        """Sub-phases measured by the engine, carved out of the phase `inside` just lapped."""
        for name, seconds in phases.items():
            self.phases[name] = self.phases.get(name, 0.0) + seconds
            self.phases[inside] = max(0.0, self.phases.get(inside, 0.0) - seconds)
        if self.phases.get(inside) == 0.0:
            del self.phases[inside]

    def as_dict(self) -> dict[str, Any]:
        ordered = {p: round(self.phases[p], 4) for p in PHASES if p in self.phases}
        return {"phases": ordered, "overlapped": {k: round(v, 4) for k, v in self.overlapped.items()},
                "weights_source": self.weights_source, "path": path_of(self.weights_source)}


# ---- dormant profile ----------------------------------------------------------------------------


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


def run_profile(source: str, engine_args: dict[str, Any] | None = None, timeout: float = 600) -> dict[str, Any]:
    """A full cold start (image deleted first) and a restore, each in a fresh worker process."""
    from dormant.store.models import materialize

    from dormant.engines.native.core.config import EngineConfig
    from dormant.store.images import EngineImage, image_dir_for

    model_dir = materialize(source)
    config = EngineConfig.from_args(model_dir, engine_args)
    EngineImage(image_dir_for(model_dir, config.dtype, config.device)).delete()
    cold = _one_start(source, engine_args or {}, timeout, write_image=True)
    restore = _one_start(source, engine_args or {}, timeout, write_image=False)
    return {"model": source, "model_dir": str(model_dir), "cold": cold, "restore": restore}


def _one_start(source: str, engine_args: dict[str, Any], timeout: float, *, write_image: bool) -> dict[str, Any]:
    import httpx

    from dormant.lifecycle.process import free_port

    port = free_port()
    argv = [sys.executable, "-m", "dormant.worker", "--source", source, "--model-id", "profile",
            "--port", str(port), "--engine-args", json.dumps(engine_args)]
    started = time.time()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=timeout) as client:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
                try:
                    if client.get(base + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("worker not healthy in time")
                time.sleep(0.02)
            body = {"model": "profile", "prompt": "Hello", "max_tokens": 1, "temperature": 0, "stream": True}
            with client.stream("POST", base + "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data:") and '"text"' in line:
                        break
            total = time.time() - started
            report = client.get(base + "/stats").json()["cold_start"]
            if write_image:  # wait for the image the next start restores from
                client.post(base + "/hibernate", timeout=timeout)
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
