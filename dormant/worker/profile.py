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
`dormant profile MODEL` (lifecycle/profile.py) starts a worker in a fresh process twice:
a full cold start with no image, then a restore from the image the first one wrote.
"""

from __future__ import annotations

import time
from typing import Any

from dormant.worker_api import COLD_START_PHASES as PHASES


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
