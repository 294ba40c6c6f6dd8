"""The one surface both model runners offer: cpu/runner.py and cuda/runner.py implement it.

A runner owns the model's weights and its KV cache on one device and runs one scheduled step
at a time. The engine (llm_engine.py) and its loop thread (async_engine.py) call only what is
here, so neither asks which runner it has: what one device lacks, its runner answers plainly
(the CPU has no deferred start-up work: `idle_work` returns None).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from dormant.engines.native.core.config import EngineConfig

# at import, not in make_runner: it brings transformers' model code (~3 s), which the zygote
# and the worker import ahead through the engine's modules
from dormant.engines.native.cpu.runner import CPUModelRunner

if TYPE_CHECKING:
    from dormant.engines.native.core.sequence import Sequence


class ModelRunner(Protocol):
    config: EngineConfig
    sleep_levels: tuple[int, ...]  # the levels `sleep` takes (engines.base.Capabilities)
    startup_phases: dict[str, float]  # seconds per cold-start phase, inside the worker's model_init
    startup_overlap: dict[str, float]  # phases that ran beside the others: their own time
    weights_source: str  # where the weights last came from: "image" or "safetensors"
    num_processed_tokens: int  # tokens run through the model (prefix-cache hits are not)
    num_decode_graph_steps: int  # decode steps replayed from a CUDA graph (0 on the CPU)
    decode_graph_gpu_seconds: float  # their time on the GPU, from CUDA events around each replay
    runs_ahead: bool  # decode steps go through launch / collect (llm_engine.py): config.run_ahead_enabled

    @property
    def weights_bytes(self) -> int: ...

    @property
    def kv_cache_bytes(self) -> int: ...

    @property
    def image_dir(self) -> Path | None:
        """The engine image's folder (written or to be written); None for a runner without images."""

    @property
    def is_sleeping(self) -> bool: ...

    def run(self, seqs: list[Sequence]) -> list[int]:
        """One step over each seq's num_scheduled_tokens; a token id for each seq whose step
        reaches its last token, in order."""

    def can_launch(self, num_seqs: int) -> bool:
        """Whether a decode step of num_seqs can go through launch (GPU: a graph holds it)."""

    def launch(self, seqs: list[Sequence], feed: tuple[Any, list[int]] | None = None) -> Any:
        """Start a decode step over seqs (each Sequence.can_run_ahead) and return its handle for
        collect, without waiting for it. feed = (an earlier launch's handle, rows): seq j's
        last token is a PLACEHOLDER whose id is that step's token of row rows[j]."""

    def collect(self, launched: Any) -> list[int]:
        """The token ids of a launch, one per seq, in order (waits for that step alone)."""

    def sleep(self, level: int) -> None:
        """Free the weights' and the KV cache's memory (one of sleep_levels); asleep: no-op."""

    def wake_up(self) -> None:
        """The weights back where they were; awake: no-op."""

    def save_image(self) -> Path | None:
        """Make sure the engine image is on disk (before hibernating); its folder, or None."""

    def idle_work(self) -> float | None:
        """One short unit of deferred start-up work, called while no request is in flight:
        None when nothing is left (until the next step or command), else the seconds to wait
        before the next call (0: at once)."""

    def capture_pending_graphs(self) -> None:
        """Do now what idle_work would have done for the steps (offline use: no idle loop)."""


def make_runner(config: EngineConfig, beside_load: Callable[[], None] | None = None) -> ModelRunner:
    """The runner for config.device. `beside_load`: called once, when other start-up work (the
    worker's tokenizer) may run beside the model's: on a GPU while the runner waits for the
    CUDA context, on the CPU first."""
    if config.device == "cuda":  # imported here: the CUDA runner pulls in triton and cuda.bindings
        from dormant.engines.native.cuda.runner import GPUModelRunner

        return GPUModelRunner(config, beside_load)
    if beside_load is not None:
        beside_load()
    return CPUModelRunner(config)
