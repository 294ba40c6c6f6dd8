"""The GPU runner's start, in named steps, and how its weights come in (image or safetensors).

    _build_meta_model   the model's shape on the meta device while the CUDA context starts
    _wait_for_context   what is left of start_cuda_context()'s thread (or the context, made here)
    _plan_arena         where weights, KV cache and graph logits lie; the KV blocks that fit
    _map_arena          the arena's memory
    _start_weights      the weights stream in, in a thread, from here on
    _make_views         parameters, logits and KV caches as views of the arena
    _make_step_state    the static buffers, sampler and wake hooks the steps use
    _capture_graphs     the decode graphs, while the weights stream in
    _finish_weights     wait for the weights; then the image write, the host backup planned
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import NamedTuple

import torch
from torch import nn

from dormant.engines.native.core.checkpoint import copy_checkpoint
from dormant.engines.native.core.config import run_ahead_enabled
from dormant.engines.native.core.engine_image import ArenaImage
from dormant.engines.native.core.quantization import UnsupportedQuantization, read_fp8_format
from dormant.engines.native.cuda.graphs import DecodeGraphs, graph_batch_sizes
from dormant.engines.native.cuda.sampler import GPUSampler
from dormant.engines.native.cuda.start import (
    GiB, activation_reserve_bytes, build_meta_model, first_kernels_warm, fuse_rms_norms, in_background,
    kv_block_bytes, load_hf_config, num_kv_blocks_for_memory, restore_threads, round_up,
)
from dormant.engines.native.kernels.compile_log import log_triton_compiles

log = logging.getLogger("dormant.engine")

_ALIGN = 256  # parameter offsets: keeps kernels' vector loads aligned
_KV_ALIGN = 2 << 20


class ArenaPlan(NamedTuple):
    """Byte offsets in the arena: weights from 0, then the KV caches, then the graph logits."""

    num_slots: int  # KV slots per layer, the scratch block's included
    layer_kv_bytes: int  # one layer's K and V
    kv_start: int
    logits_start: int
    logits_shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.logits_start + self.logits_shape[0] * self.logits_shape[1] * 2


class RunnerStart:
    """GPUModelRunner's start and loading (cuda/runner.py holds the class and its state)."""

    def _build_meta_model(self) -> tuple[list, list[int]]:
        """The model on the meta device; its (name, parameter) pairs and their arena offsets.
        Sets _weights_bytes."""
        config = self.config
        self.hf_config = hf = load_hf_config(self.model_dir)
        from dormant.engines.native.cuda import compact_decoder

        self.is_compact = config.compact_decoder and compact_decoder.supports(hf)
        self.quant = read_fp8_format(self.model_dir)  # None, or the FP8 format (issue 12)
        if self.quant is not None and not self.is_compact:
            raise UnsupportedQuantization(
                f"{self.model_dir.name}: an FP8 checkpoint ({self.quant.quant_method}) runs on the compact decoder "
                f"only (model_type llama, mistral, qwen2 or qwen3 with compact_decoder true); this one is "
                f"{hf.model_type} with compact_decoder {config.compact_decoder}")
        # the RoPE table on the CPU (0.2 s for 40k positions) beside the arena's mapping
        self._rope = (in_background(lambda: compact_decoder.rope_table(hf, config.max_model_len, self.dtype),
                                    None, "dormant-rope") if self.is_compact else None)
        if self.is_compact:
            with torch.device("meta"):
                self.model = compact_decoder.CompactDecoder(hf, self.dtype, self.quant).eval()
        else:
            self.model = build_meta_model(hf, self.dtype)
        named = list(self.model.named_parameters())  # tied weights appear once
        offsets, end = [], 0
        for _, p in named:
            offsets.append(end)
            end = round_up(end + p.numel() * p.element_size(), _ALIGN)
        self._weights_bytes = end
        return named, offsets

    def _wait_for_context(self, early: Future | None) -> None:
        waited = time.perf_counter()
        if early is not None:  # start_cuda_context() ran: wait for what is left of it
            self.startup_overlap["cuda_context"], self._staging = early.result()
        self.device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(self.device)
        torch.empty(1, device=self.device)  # creates the CUDA context (if not yet): its own phase
        self.startup_phases["cuda_context"] = time.perf_counter() - waited
        if self.quant is not None and torch.cuda.get_device_capability(self.device) < (8, 9):
            raise UnsupportedQuantization(
                f"{self.model_dir.name}: FP8 matrix multiplies need compute capability 8.9 or newer (Ada, Hopper); "
                f"{torch.cuda.get_device_name(self.device)} is {torch.cuda.get_device_capability(self.device)}")

    def _plan_arena(self) -> ArenaPlan:
        """Sizes the KV cache to the free memory when num_kv_blocks is not set (and sets it)."""
        config, hf = self.config, self.hf_config
        self.num_layers = hf.num_hidden_layers
        self.num_kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
        self.head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        block_bytes = kv_block_bytes(self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, 2)
        if config.num_kv_blocks is None:
            free, total = torch.cuda.mem_get_info(self.device)
            reserve = activation_reserve_bytes(hf, config.max_num_batched_tokens, config.max_num_seqs)
            num_blocks = num_kv_blocks_for_memory(total, free, config.gpu_memory_utilization,
                                                  self._weights_bytes, reserve, block_bytes)
            if num_blocks * self.block_size < config.max_model_len and num_blocks * self.block_size < 4096:
                raise RuntimeError(
                    f"GPU memory: {free / GiB:.1f} of {total / GiB:.1f} GiB free leaves room for "
                    f"{num_blocks * self.block_size} KV tokens after {self._weights_bytes / GiB:.1f} GiB of "
                    "weights; raise gpu_memory_utilization or free the GPU")
            config.set_num_kv_blocks(num_blocks)
        num_slots = (config.num_kv_blocks + 1) * self.block_size  # + the scratch block
        self.scratch_block = config.num_kv_blocks
        layer_kv_bytes = 2 * num_slots * self.num_kv_heads * self.head_dim * 2
        kv_start = round_up(self._weights_bytes, _KV_ALIGN)
        self._kv_bytes = self.num_layers * layer_kv_bytes
        logits_start = round_up(kv_start + self._kv_bytes, _ALIGN)
        return ArenaPlan(num_slots, layer_kv_bytes, kv_start, logits_start, (config.max_num_seqs, hf.vocab_size))

    def _map_arena(self, plan: ArenaPlan, started: float) -> None:
        from dormant.engines.native.cuda.arena import CudaArena

        arena_started = time.perf_counter()
        self.arena = CudaArena(plan.nbytes, device=self.device.index)
        log.info("arena of %.1f GiB mapped in %.3f s (%.3f s after the runner's start)", self.arena.nbytes / GiB,
                 time.perf_counter() - arena_started, time.perf_counter() - started)

    def _start_weights(self, layout: dict) -> Future:
        """The weights stream in (image or safetensors) from here on, while this thread builds
        the views and captures the decode graphs: both need the arena's addresses, not its
        values (bench/README.md, "Restore: weights beside graph capture"). The safetensors path waits for the views."""
        from dormant.engines.native.cuda.prefetch import prefetch_runtime_files

        self._image_copied = threading.Event()  # cleared while an image write copies the arena
        self._image_copied.set()
        self._views_ready = threading.Event()
        # cuBLAS's and Triton's files asked for before the image reads fill the disk queue; in
        # this thread: a helper thread's syscalls, one GIL hand-off each, took 0.4-0.6 s of
        # a restore beside this one
        prefetch_runtime_files()
        return in_background(lambda: self._fill_weights(layout), self.device, "dormant-weights")

    def _make_views(self, named: list, offsets: list[int], plan: ArenaPlan) -> None:
        try:
            self.static_logits = self.arena.tensor(plan.logits_start, plan.logits_shape, self.dtype)
            for (_, param), offset in zip(named, offsets):
                view = self.arena.tensor(offset, tuple(param.shape), param.dtype)
                torch.utils.swap_tensors(param, nn.Parameter(view, requires_grad=False))
        finally:
            self._views_ready.set()
        self._rebuild_buffers()
        fuse_rms_norms(self.model)
        kv_shape = (plan.num_slots, self.num_kv_heads, self.head_dim)
        self.kv_caches = []
        for layer in range(self.num_layers):
            base = plan.kv_start + layer * plan.layer_kv_bytes
            self.kv_caches.append((self.arena.tensor(base, kv_shape, self.dtype),
                                   self.arena.tensor(base + plan.layer_kv_bytes // 2, kv_shape, self.dtype)))

    def _make_step_state(self) -> None:
        self.decode_backend = self.config.decode_attention
        self.sampler = GPUSampler()
        self.runs_ahead = run_ahead_enabled(True)
        self._prompt_rows: list = []  # the last packed step's prompt-logprob chunks (runner_step.py)
        self.num_processed_tokens = 0  # tokens run through the model (prefix-cache hits are not)
        self.num_decode_graph_steps = 0
        self.decode_graph_gpu_seconds = 0.0
        self._replay_events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        self._make_static_buffers()
        self._wake_events: list | None = None
        self._waited: set[int] = set()
        self._register_wake_hooks()
        self.sleep_level = 0

    def _capture_graphs(self, weights: Future, started: float) -> None:
        """Sizes in graphs.capture_order while the weights stream in (batch 1 and the largest
        at least, so every decode batch has a graph from the first request on); those left
        when the weights have landed are captured in idle time or before a step they spare
        padding of over 2x (graphs.worth_capturing; a warm restore spent 2.0 s on
        11 sizes beside a 0.9 s load, bench/README.md, "Restore: weights beside graph capture").
        defer_graphs_above: a fixed set before serving instead."""
        config = self.config
        sizes = graph_batch_sizes(config.cuda_graph_batch_sizes, config.max_num_seqs)
        graphs_started = time.perf_counter()
        log_triton_compiles()  # the kernels' first use is just below
        first_kernels_warm()  # cuBLAS's first use, made in the context's thread: nearly always done
        log.info("graph capture starts %.3f s after the runner's start", graphs_started - started)
        self.graphs = (DecodeGraphs(self._decode_forward, sizes, defer_above=config.defer_graphs_above,
                                    stop_when=weights.done) if sizes else None)
        self.startup_phases["graph_capture"] = time.perf_counter() - graphs_started

    def _finish_weights(self, weights: Future) -> None:
        waited = time.perf_counter()
        self.weights_source = weights.result()  # re-raises a failed load
        self.startup_phases["weight_load"] = time.perf_counter() - waited  # what capture did not hide
        # The pinned host backup (DESIGN §4b): planned now; the image write's thread pins it a
        # piece at a time, pausing between pieces so that the main thread's CUDA calls get
        # through (each registration holds the driver's lock ~10 ms; ~0.6 s in all for an 8B
        # model on the H200, bench/README.md "Arena: pinning the host backup"), then copies the
        # weights into it. Without that thread idle_work pins it, and sleep() pins what is
        # still missing.
        self.arena.reserve_host_backup(self._weights_bytes)
        self._image_write = self._start_image_write()  # after capture: no CUDA work beside it
        self._last_busy = time.monotonic()

    # -- loading ------------------------------------------------------------------------------

    def _fill_weights(self, layout: dict) -> str:
        """The arena's weight bytes from the engine image when a good one exists (issue 4),
        else from the safetensors (the image is then written after graph capture). Returns
        "image" or "safetensors"; a bad image is logged, deleted and rebuilt."""
        config = self.config
        startup = {"num_kv_blocks": config.num_kv_blocks, "block_size": self.block_size,
                   "max_model_len": config.max_model_len, "max_num_seqs": config.max_num_seqs,
                   "cuda_graph_batch_sizes": graph_batch_sizes(config.cuda_graph_batch_sizes, config.max_num_seqs)}
        opened = time.perf_counter()
        self.image = ArenaImage(self.model_dir, config.dtype, "cuda", layout, startup, threads=restore_threads())
        started = time.perf_counter()
        log.info("weights: image opened in %.3f s (fingerprint)", started - opened)
        source = self.image.restore_cuda(self.arena, self._weights_bytes, staging=self._staging)
        if source is None:
            self._views_ready.wait()  # load_weights copies into the parameters' arena views
            self.load_weights()
            source = "safetensors"
        self.startup_overlap["weight_load"] = time.perf_counter() - started
        return source

    def _start_image_write(self) -> threading.Thread | None:
        """A thread that pins the host backup, copies the weights into it and writes the image
        from there; where the image is not written (a full disk, or there already) it still
        fills the backup. A sleep waits for the copy (not for the write) and then copies
        nothing: on the H200 a victim chosen right after its start waited 3-5 s for the
        image's own pageable copy, then copied the weights again, and with the disk full it
        pinned the whole backup in the sleep (1.5-9 s). Weights from the image: no thread
        (idle_work pins and fills the backup once the first requests are served: the first
        request after a restore runs beside no pinning)."""
        if self.weights_source == "image" or not self.config.backup_weights:
            return None
        self._image_copied.clear()

        def back_up() -> None:
            try:
                self.image.save_cuda(self.arena, self._weights_bytes, self._image_copied)
            finally:
                try:
                    if not self._image_copied.is_set():
                        self.arena.fill_host_backup(self._weights_bytes)
                finally:
                    self._image_copied.set()

        thread = threading.Thread(target=back_up, name="dormant-image-write", daemon=True)
        thread.start()
        return thread

    def load_weights(self) -> None:
        params = self.model.checkpoint_tensors() if self.is_compact else dict(self.model.named_parameters())
        copy_checkpoint(self.model_dir, params)
        torch.cuda.current_stream(self.device).synchronize()  # not the device: capture may be running

    def _rebuild_buffers(self) -> None:
        """RoPE inv_freq is not in checkpoints: rebuild it, in fp32, on the GPU (outside the
        arena, so it survives sleep). The compact decoder: its cos/sin table, computed on the
        CPU by the thread _build_meta_model began, copied over."""
        if self.is_compact:
            self.model.build_rope(self.config.max_model_len, self.device, self.dtype, table=self._rope.result())
            self._rope = None
            return
        for name, module in list(self.model.named_modules()):
            if name.endswith("rotary_emb"):
                with torch.device(self.device):
                    fresh = type(module)(config=getattr(module, "config", self.hf_config))
                parent_name, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, fresh)
        for name, buf in self.model.named_buffers():
            if buf.is_meta:
                raise RuntimeError(f"buffer {name} has no value after load (unsupported model family?)")
