"""The model runner on a CUDA GPU: weights and the paged KV cache in one `CudaArena`.

Layout of the arena: every parameter (bf16, in module order), then per layer a K and a V
cache of `num_kv_blocks + 1` blocks (the last block is scratch for padded graph rows).
Sleep level 1 keeps only the weight bytes (pinned host backup, pinned a 256 MiB piece at a time
by idle_work once the engine has served, or by the sleep itself if it comes first); level 2
keeps nothing and reloads the safetensors on wake. Wake is pipelined:
it returns once the chunks are mapped and their copies queued; the first forward after it
waits, module by module, on the events of the chunks that hold that module's parameters.

A step of decodes only runs through a CUDA graph (graphs.py; the smallest captured one that
holds it, padded) over static input buffers,
filled by one host-to-device copy from a pinned staging buffer (plus one for the block
tables); the graph also takes the argmax, so a greedy step reads back only the token ids. A
step with prompt tokens (prefills, prompt chunks, decodes riding along, a cached prefix read
from the KV cache) runs eagerly as one packed forward. The logits of graph steps land in a
buffer at the end of the arena: it holds no memory while asleep. RMSNorms run as one fused
kernel each (F.rms_norm) instead of transformers' seven: at batch 1 the step is bound by its
kernel count, not only by the weight bytes (bench/README.md, "Engine: kernel count at batch 1"). Llama-family models
(Llama, Mistral, Qwen2, Qwen3) run our compact decoder instead (compact_decoder.py: ~9
kernels per layer, fused q/k/v and gate/up weights, one varlen prefill launch per layer);
`compact_decoder=False` in the engine config keeps transformers' model.

The class is in three files: this one (its state, sleep, wake and idle work), runner_start.py
(the start's named steps, the weights' loading) and runner_step.py (the steps).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from dormant.engines.native.core.config import EngineConfig
from dormant.engines.native.core.engine_image import layout_of
from dormant.engines.native.cuda.runner_start import RunnerStart
from dormant.engines.native.cuda.runner_step import RunnerSteps
from dormant.engines.native.cuda.start import GiB, set_cublas_workspace, take_early_context

log = logging.getLogger("dormant.engine")

# idle_work starts this long after the last step or wake: a restore's first request (the one
# that caused it) arrives ~0.5 s after the warm-up and must not wait behind it.
IDLE_GRACE_S = 2.0
# a wake may map memory that another replica's sleep is still releasing, chunk by chunk (the
# placer lets it start then: lifecycle/placement.py, Need.streams_in); it gives up after this
WAKE_MEMORY_WAIT_S = 30.0
OVERLAP_SWITCH_INTERVAL_S = 0.0005  # the GIL's switch interval while weights stream beside capture


class GPUModelRunner(RunnerStart, RunnerSteps):
    """core/runner.py's ModelRunner on a CUDA GPU."""

    sleep_levels = (1, 2)

    def __init__(self, config: EngineConfig, beside_load: Callable[[], None] | None = None):
        """`beside_load`: called once, at the start, while this thread waits for the CUDA
        context (see make_runner)."""
        self.config = config
        self.dtype = torch.bfloat16
        self.block_size = config.block_size
        self.model_dir = Path(config.model_dir)
        set_cublas_workspace()
        self.startup_phases: dict[str, float] = {}  # seconds per cold-start phase (worker /stats)
        self.startup_overlap: dict[str, float] = {}  # phases that ran beside others: their own time
        started = time.perf_counter()
        early = take_early_context()
        self._staging = None  # pinned, for the image reads; freed once the start is over
        # Threads run beside this one from here on (CUDA context, RoPE, weights, tokenizer): all
        # Python between GIL-free calls, and a 5 ms switch interval let one side wait that long
        # for the GIL at each op (bench/README.md, "Restore: the GIL"), so hand it over sooner
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(switch_interval, OVERLAP_SWITCH_INTERVAL_S))
        try:
            self._start(beside_load, early, started)
        finally:
            sys.setswitchinterval(switch_interval)
            if self._staging is not None:  # freed after capture: cuMemFreeHost may synchronize
                self._staging.close()
                self._staging = None

    def _start(self, beside_load, early, started: float) -> None:
        """The start in named steps (runner_start.py). The weights stream in, in a thread,
        from _start_weights to _finish_weights; the views and the graph capture run beside."""
        if beside_load is not None:
            beside_load()
        named, offsets = self._build_meta_model()
        layout = layout_of(named, offsets, self._weights_bytes)
        self._wait_for_context(early)
        plan = self._plan_arena()
        self._map_arena(plan, started)
        weights = self._start_weights(layout)  # from here on, beside what follows
        self._make_views(named, offsets, plan)
        self._make_step_state()
        self._capture_graphs(weights, started)
        self._finish_weights(weights)
        graphs = self.graphs
        log.info("GPU runner ready in %.2f s: weights %.2f GiB from %s (%.2f s, beside capture), KV %d blocks "
                 "(%.2f GiB), graphs captured in %.2f s (s each, by size: %s; %s later)",
                 time.perf_counter() - started, self._weights_bytes / GiB, self.weights_source,
                 self.startup_overlap.get("weight_load", 0.0), self.config.num_kv_blocks, self._kv_bytes / GiB,
                 self.startup_phases["graph_capture"],
                 {k: round(v, 3) for k, v in sorted(graphs.capture_seconds.items())} if graphs else {},
                 graphs.pending if graphs else [])

    # -- sleep --------------------------------------------------------------------------------

    @property
    def weights_bytes(self) -> int:
        return self._weights_bytes

    @property
    def kv_cache_bytes(self) -> int:
        return self._kv_bytes

    @property
    def is_sleeping(self) -> bool:
        return self.sleep_level > 0

    def sleep(self, level: int = 1) -> None:
        """Level 1: weights copied to the pinned host backup, the KV cache dropped; level 2:
        everything dropped (wake reloads the safetensors). Either way the arena's physical
        memory is released; the process keeps its CUDA context, the graphs' pool and
        torch's small buffers (~0.7-0.9 GiB on the H100). Asleep: no-op."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        if self.is_sleeping:
            return
        self._image_copied.wait()  # the image write copies the weights into the backup first
        # the weights are read-only while awake: a backup that holds them is not written again
        self.arena.sleep(keep_bytes=self._weights_bytes if level == 1 else 0, reuse_backup=True)
        torch.cuda.empty_cache()
        self.sleep_level = level

    def wake_up(self) -> None:
        """Map the same addresses again, each chunk as soon as the device has the memory (another
        replica may still be releasing it). Level 1 returns once the copies are queued (the next
        forward waits per module on its chunks); level 2 reloads the weights first. Awake: no-op."""
        if not self.is_sleeping:
            return
        if self.sleep_level == 1:
            self._wake_events = self.arena.wake(pipelined=True, wait_for_memory_s=WAKE_MEMORY_WAIT_S)
            self._waited = set()
        else:
            self.arena.wake(wait_for_memory_s=WAKE_MEMORY_WAIT_S)
            self.load_weights()
        self.sleep_level = 0
        self._last_busy = time.monotonic()

    # -- idle work ----------------------------------------------------------------------------

    def idle_work(self) -> float | None:
        """One short unit of deferred start-up work; the async engine calls it while no request
        is in flight. Returns None when nothing is left (until the next step or command),
        0 to be called again at once, or the seconds to wait first.

        Nothing before the first served step (the warm-up) or within IDLE_GRACE_S of the last
        step; then the decode graphs still pending (~0.15 s each, once the image write has
        copied the weights; until then their batches pad up to a captured size), then the host
        backup, one 256 MiB piece pinned in place (~10 ms) a call, then the weights' copy into
        it, queued (~0.3 s for 16 GB on the H200, beside what comes next: a sleep then copies
        nothing)."""
        if self.is_sleeping or self.num_processed_tokens == 0:
            return None
        graphs_left = self.graphs is not None and bool(self.graphs.pending)
        fill_left = (self._image_copied.is_set() and self.arena.host_backup_bytes >= self._weights_bytes
                     and self.arena.backup_holds < self._weights_bytes and not self.arena.backup_filling)
        if not graphs_left and not self.arena.host_backup_pending and not fill_left:
            return None
        wait = self._last_busy + IDLE_GRACE_S - time.monotonic()
        if wait > 0:
            return wait
        if graphs_left and self._image_copied.is_set():
            self._capture_pending_graph()
        elif self.arena.host_backup_pending:
            if not self.arena.pin_host_backup_step():
                log.info("host backup pinned: %.2f GiB", self.arena.host_backup_bytes / GiB)
        elif fill_left:
            self.arena.fill_host_backup(self._weights_bytes, wait=False)
        elif graphs_left:  # only graphs left, the image write still copying: look again soon
            return 0.05
        return 0.0

    def capture_pending_graphs(self) -> None:
        """Capture every decode graph still pending, now (offline use: LLMEngine.generate)."""
        while self.graphs is not None and self.graphs.pending:
            self._image_copied.wait()
            self._capture_pending_graph()

    # -- the engine image ---------------------------------------------------------------------

    @property
    def image_dir(self) -> Path:
        return self.image.folder

    def save_image(self) -> Path:
        """Make sure the engine image is on disk (before hibernating); returns its folder."""
        if self._image_write is not None:
            self._image_write.join()
        self.image.save_cuda(self.arena, self._weights_bytes)  # asleep: from the backup, if it holds them
        return self.image.folder
