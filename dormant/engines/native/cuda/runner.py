"""The model runner on a CUDA GPU: weights and the paged KV cache in one `CudaArena`.

Layout of the arena: every parameter (bf16, in module order), then per layer a K and a V
cache of `num_kv_blocks + 1` blocks (the last block is scratch for padded graph rows).
Sleep level 1 keeps only the weight bytes (pinned host backup, pinned 64 MiB at a time by
idle_work once the engine has served, or by the sleep itself if it comes first); level 2
keeps nothing and reloads the safetensors on wake. Wake is pipelined:
it returns once the chunks are mapped and their copies queued; the first forward after it
waits, module by module, on the events of the chunks that hold that module's parameters.

A step of decodes only runs through a CUDA graph (cuda_graphs.py) over static input buffers,
filled by one host-to-device copy from a pinned staging buffer (plus one for the block
tables); the graph also takes the argmax, so a greedy step reads back only the token ids. A
step with prompt tokens (prefills, prompt chunks, decodes riding along, a cached prefix read
from the KV cache) runs eagerly as one packed forward. The logits of graph steps land in a
buffer at the end of the arena: it holds no memory while asleep. RMSNorms run as one fused
kernel each (F.rms_norm) instead of transformers' seven: at batch 1 the step is bound by its
kernel count, not only by the weight bytes (bench/NOTES-gpu-engine.md). Llama-family models
(Llama, Mistral, Qwen2, Qwen3) run our compact decoder instead (compact_decoder.py: ~9
kernels per layer, fused q/k/v and gate/up weights, one varlen prefill launch per layer);
`compact_decoder=False` in the engine config keeps transformers' model.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from dormant.engines.native.cpu.attention import METADATA_KWARG
from dormant.engines.native.core.config import EngineConfig
from dormant.engines.native.cuda.graphs import DecodeGraphs, graph_batch_sizes
from dormant.engines.native.core.engine_image import ArenaImage, layout_of
from dormant.engines.native.cuda.attention import PREFILL_BLOCK_M, GPUAttentionMetadata
from dormant.engines.native.cuda.sampler import GPUSampler
from dormant.engines.native.cuda.start import (
    GiB, activation_reserve_bytes, build_meta_model, first_kernels_warm, fuse_rms_norms, in_background,
    kv_block_bytes, load_hf_config, num_kv_blocks_for_memory, restore_threads, round_up, set_cublas_workspace,
    take_early_context,
)
from dormant.engines.native.core.checkpoint import copy_checkpoint
from dormant.engines.native.core.sequence import Sequence
from dormant.engines.native.core.step_plan import fill_decode_rows, plan_packed_step

log = logging.getLogger("dormant.engine")

_ALIGN = 256  # parameter offsets: keeps kernels' vector loads aligned
_KV_ALIGN = 2 << 20
# idle_work starts this long after the last step or wake: a restore's first request (the one
# that caused it) arrives ~0.5 s after the warm-up and must not wait behind it.
IDLE_GRACE_S = 2.0
OVERLAP_SWITCH_INTERVAL_S = 0.0005  # the GIL's switch interval while weights stream beside capture


class GPUModelRunner:
    # When the worker's beside_load (its tokenizer: ~0.45 s, mostly holding the GIL) runs:
    # "start", while this thread waits for the CUDA context, or "weights", once they stream in
    # (bench/restore_variants.py compares them)
    beside_load_at = "start"

    def __init__(self, config: EngineConfig, beside_load: Callable[[], None] | None = None):
        """`beside_load`: called once, at the start or once the weights stream in
        (`beside_load_at`, see LLMEngine)."""
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
        # for the GIL at each op (bench/NOTES-hibernate.md), so hand it over sooner
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
        from dormant.engines.native.cuda.arena import CudaArena
        from dormant.engines.native.cuda.prefetch import prefetch_runtime_files

        config = self.config
        if beside_load is not None and self.beside_load_at == "start":
            beside_load()
        # The model's shape on the meta device while the CUDA context is still starting
        self.hf_config = hf = load_hf_config(self.model_dir)
        from dormant.engines.native.cuda import compact_decoder

        self.is_compact = config.compact_decoder and compact_decoder.supports(hf)
        # the RoPE table on the CPU (0.2 s for 40k positions) beside the arena's mapping
        self._rope = (in_background(lambda: compact_decoder.rope_table(hf, config.max_model_len, self.dtype),
                                    None, "dormant-rope") if self.is_compact else None)
        if self.is_compact:
            with torch.device("meta"):
                self.model = compact_decoder.CompactDecoder(hf).to(self.dtype).eval()
        else:
            self.model = build_meta_model(hf, self.dtype)
        named = list(self.model.named_parameters())  # tied weights appear once
        offsets, end = [], 0
        for _, p in named:
            offsets.append(end)
            end = round_up(end + p.numel() * p.element_size(), _ALIGN)
        self._weights_bytes = end

        layout = layout_of(named, offsets, self._weights_bytes)
        waited = time.perf_counter()
        if early is not None:  # start_cuda_context() ran: wait for what is left of it
            self.startup_overlap["cuda_context"], self._staging = early.result()
        self.device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(self.device)
        torch.empty(1, device=self.device)  # creates the CUDA context (if not yet): its own phase
        self.startup_phases["cuda_context"] = time.perf_counter() - waited

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
        logits_shape = (config.max_num_seqs, hf.vocab_size)
        arena_started = time.perf_counter()
        self.arena = CudaArena(logits_start + logits_shape[0] * logits_shape[1] * 2, device=self.device.index)
        log.info("arena of %.1f GiB mapped in %.3f s (%.3f s after the runner's start)", self.arena.nbytes / GiB,
                 time.perf_counter() - arena_started, time.perf_counter() - started)
        # The weights stream in (image or safetensors) from here on, while this thread builds
        # the views and captures the decode graphs: both need the arena's addresses, not its
        # values (bench/NOTES-hibernate.md). The safetensors path waits for the views.
        self._image_copied = threading.Event()  # cleared while an image write copies the arena
        self._image_copied.set()
        self._views_ready = threading.Event()
        # cuBLAS's and Triton's files asked for before the image reads fill the disk queue; in
        # this thread: a helper thread's syscalls, one GIL hand-off each, took 0.4-0.6 s of
        # a restore beside this one
        prefetch_runtime_files()
        weights = in_background(lambda: self._fill_weights(layout), self.device, "dormant-weights")
        if beside_load is not None and self.beside_load_at == "weights":
            beside_load()
        try:
            self.static_logits = self.arena.tensor(logits_start, logits_shape, self.dtype)
            for (_, param), offset in zip(named, offsets):
                view = self.arena.tensor(offset, tuple(param.shape), param.dtype)
                torch.utils.swap_tensors(param, nn.Parameter(view, requires_grad=False))
        finally:
            self._views_ready.set()
        self._rebuild_buffers()
        fuse_rms_norms(self.model)
        kv_shape = (num_slots, self.num_kv_heads, self.head_dim)
        self.kv_caches = []
        for layer in range(self.num_layers):
            base = kv_start + layer * layer_kv_bytes
            self.kv_caches.append((self.arena.tensor(base, kv_shape, self.dtype),
                                   self.arena.tensor(base + layer_kv_bytes // 2, kv_shape, self.dtype)))

        self.decode_backend = config.decode_attention
        self.sampler = GPUSampler()
        self.num_processed_tokens = 0  # tokens run through the model (prefix-cache hits are not)
        self._make_static_buffers()
        self._wake_events: list | None = None
        self._waited: set[int] = set()
        self._register_wake_hooks()
        self.sleep_level = 0
        sizes = graph_batch_sizes(config.cuda_graph_batch_sizes, config.max_num_seqs)
        graphs_started = time.perf_counter()
        first_kernels_warm()  # cuBLAS's first use, made in the context's thread: nearly always done
        log.info("graph capture starts %.3f s after the runner's start", graphs_started - started)
        # Sizes ascending while the weights stream in; those left when they have landed are
        # captured when a step first needs them or in idle time (a warm restore spent 2.0 s
        # on 11 sizes beside a 0.9 s load, bench/NOTES-hibernate.md). defer_graphs_above: a
        # fixed set before serving instead.
        self.graphs = (DecodeGraphs(self._decode_forward, sizes, defer_above=config.defer_graphs_above,
                                    stop_when=weights.done) if sizes else None)
        self.startup_phases["graph_capture"] = time.perf_counter() - graphs_started
        waited = time.perf_counter()
        self.weights_source = weights.result()  # re-raises a failed load
        self.startup_phases["weight_load"] = time.perf_counter() - waited  # what capture did not hide
        self._image_write = self._start_image_write()  # after capture: no CUDA work beside it
        # The pinned host backup (DESIGN §4b) costs ~0.45 s/GiB: 7 s for an 8B model, which
        # stalled every start when pinned here in one call (bench/NOTES-hibernate.md). Only
        # planned now; idle_work pins it 64 MiB at a time once the engine has served and is
        # idle, and sleep() pins whatever is still missing.
        self.arena.reserve_host_backup(self._weights_bytes)
        self._last_busy = time.monotonic()
        log.info("GPU runner ready in %.2f s: weights %.2f GiB from %s (%.2f s, beside capture), KV %d blocks "
                 "(%.2f GiB), graphs captured in %.2f s (s each, by size: %s; %s later)",
                 time.perf_counter() - started, self._weights_bytes / GiB, self.weights_source,
                 self.startup_overlap.get("weight_load", 0.0), config.num_kv_blocks, self._kv_bytes / GiB,
                 self.startup_phases["graph_capture"],
                 {k: round(v, 3) for k, v in sorted(self.graphs.capture_seconds.items())} if self.graphs else {},
                 self.graphs.pending if self.graphs else [])

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
        if self.weights_source == "image" or not self.config.backup_weights:
            return None
        self._image_copied.clear()
        thread = threading.Thread(target=self.image.save_cuda, args=(self.arena, self._weights_bytes, self._image_copied),
                                  name="dormant-image-write", daemon=True)
        thread.start()
        return thread

    def save_image(self) -> Path:
        """Make sure the engine image is on disk (before hibernating); returns its folder."""
        if self._image_write is not None:
            self._image_write.join()
        if not self.is_sleeping:
            self.image.save_cuda(self.arena, self._weights_bytes)
        return self.image.folder

    def load_weights(self) -> None:
        params = self.model.checkpoint_tensors() if self.is_compact else dict(self.model.named_parameters())
        copy_checkpoint(self.model_dir, params)
        torch.cuda.current_stream(self.device).synchronize()  # not the device: capture may be running

    def _rebuild_buffers(self) -> None:
        """RoPE inv_freq is not in checkpoints: rebuild it, in fp32, on the GPU (outside the
        arena, so it survives sleep). The compact decoder: its cos/sin table, computed on the
        CPU by the thread _start began, copied over."""
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

    # -- stepping -----------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, seqs: list[Sequence]) -> list[int]:
        """One step over each seq's num_scheduled_tokens; a token id for each seq whose step
        reaches its last token, in order."""
        size = None
        if self.graphs is not None and all(seq.is_decode for seq in seqs):
            size = self.graphs.padded_size(len(seqs))
            wanted = self.graphs.wanted_size(len(seqs))
            # a size deferred at start: capture it now (~0.05-0.1 s, once) rather than run
            # this batch eagerly or padded far up; not while an image write copies the arena
            if wanted is not None and wanted != size and wanted in self.graphs.pending and self._image_copied.is_set():
                self._capture_pending_graph(wanted)
                size = wanted
        if size is not None:
            if self._wake_events is not None:  # graphs read every layer: wait for all of it
                for event in self._wake_events:
                    torch.cuda.current_stream().wait_event(event)
            logits, greedy_ids = self._decode(seqs, size)
        else:
            logits, greedy_ids = self._forward_packed(seqs), None
        self._wake_events = None
        self.num_processed_tokens += sum(seq.num_scheduled_tokens for seq in seqs)
        self._last_busy = time.monotonic()
        sampling = [seq for seq in seqs if seq.samples_this_step]
        return self.sampler(logits, sampling, greedy_ids) if sampling else []

    def _forward_packed(self, seqs: list[Sequence]) -> torch.Tensor:
        """One eager forward over the step's tokens, decodes packed first (one Triton launch),
        then prompt chunks. Returns the logits of the seqs that sample, in seqs' order."""
        plan = plan_packed_step(seqs, self.block_size, self.scratch_block, PREFILL_BLOCK_M,
                                gather_context=not self.is_compact)
        # one host-to-device copy for every vector of the step
        packed = torch.tensor(plan.vectors(), dtype=torch.long).pin_memory().to(self.device, non_blocking=True)
        t, k, d, nq = len(plan.tokens), len(plan.keep), len(plan.context_lens), len(plan.query_blocks[0])
        input_ids, position_ids, slot_mapping, rest = packed[:t], packed[t:2 * t], packed[2 * t:3 * t], packed[3 * t:]
        logits_to_keep, context_lens, rest = rest[:k], rest[k:k + d], rest[k + d:]
        prefill_blocks, ctx = (rest[:nq], rest[nq:2 * nq], rest[2 * nq:3 * nq]), rest[3 * nq:]
        meta = GPUAttentionMetadata(
            is_prefill=True, slot_mapping=slot_mapping, kv_caches=self.kv_caches, block_size=self.block_size,
            cu_seqlens=plan.cu_seqlens, num_decodes=plan.num_decodes,
            context_slots=[None if r is None else ctx[r[0]:r[1]] for r in plan.context_ranges],
            block_tables=torch.tensor(plan.tables, dtype=torch.int32).pin_memory().to(self.device, non_blocking=True),
            context_lens=context_lens, decode_backend=self.decode_backend, prefill_blocks=prefill_blocks,
        )
        return self._model_forward(input_ids, position_ids, meta, logits_to_keep)

    def _model_forward(self, input_ids, positions, meta, logits_to_keep, logits_out=None) -> torch.Tensor:
        """[T] ids and positions -> logits of the kept rows (all when logits_to_keep is None)."""
        if self.is_compact:
            return self.model(input_ids, positions, meta, logits_to_keep, logits_out)
        out = self.model(
            input_ids=input_ids.unsqueeze(0), position_ids=positions.unsqueeze(0), use_cache=False,
            logits_to_keep=0 if logits_to_keep is None else logits_to_keep, **{METADATA_KWARG: meta},
        )
        if logits_out is None:
            return out.logits[0]
        logits_out.copy_(out.logits[0])
        return logits_out

    def _make_static_buffers(self) -> None:
        n = self.config.max_num_seqs
        self.max_blocks_per_seq = -(-self.config.max_model_len // self.block_size)
        dev = self.device
        # rows: input ids, positions, slots, context lengths; one copy fills them all
        self.static_inputs = torch.zeros((4, n), dtype=torch.long, device=dev)
        self.static_input_ids, self.static_positions, self.static_slot_mapping, self.static_context_lens = self.static_inputs
        self.static_slot_mapping.fill_(self.scratch_block * self.block_size)
        self.static_context_lens.fill_(1)
        self.static_block_tables = torch.full((n, self.max_blocks_per_seq), self.scratch_block, dtype=torch.int32, device=dev)
        # pinned staging, two of each: a step fills one while the other's copy may be in flight;
        # one pinned allocation (each costs a driver call, ~35 ms apiece at start)
        inputs_bytes, tables_bytes = 4 * n * 8, round_up(n * self.max_blocks_per_seq * 4, 8)
        pinned = torch.empty(2 * (inputs_bytes + tables_bytes), dtype=torch.uint8, pin_memory=True)
        self._host_inputs, self._host_tables = [], []
        for i in range(2):
            base = i * (inputs_bytes + tables_bytes)
            self._host_inputs.append(pinned[base:base + inputs_bytes].view(torch.long).view(4, n).zero_())
            tables = pinned[base + inputs_bytes:base + inputs_bytes + n * self.max_blocks_per_seq * 4].view(torch.int32)
            self._host_tables.append(tables.view(n, self.max_blocks_per_seq).fill_(self.scratch_block))
        self._flip = 0

    def _decode_forward(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step over the first batch_size rows of the static buffers (eager, or
        captured by DecodeGraphs); returns the [batch_size, vocab] logits (a view of the
        static logits buffer) and their argmax."""
        meta = GPUAttentionMetadata(
            is_prefill=False, slot_mapping=self.static_slot_mapping[:batch_size],
            kv_caches=self.kv_caches, block_size=self.block_size,
            block_tables=self.static_block_tables[:batch_size],
            context_lens=self.static_context_lens[:batch_size],
            decode_backend=self.decode_backend,
        )
        # logits land outside the graph pool (graphs of all sizes share the buffer)
        logits = self._model_forward(self.static_input_ids[:batch_size], self.static_positions[:batch_size],
                                     meta, None, self.static_logits[:batch_size])
        return logits, logits.argmax(dim=-1)

    def _decode(self, seqs: list[Sequence], size: int) -> tuple[torch.Tensor, torch.Tensor]:
        host_t, tables_t = self._host_inputs[self._flip], self._host_tables[self._flip]
        self._flip ^= 1
        fill_decode_rows(host_t.numpy(), tables_t.numpy(), seqs, size, self.block_size, self.scratch_block)
        self.static_inputs.copy_(host_t, non_blocking=True)
        self.static_block_tables[:size].copy_(tables_t[:size], non_blocking=True)  # whole rows: contiguous
        logits, greedy_ids = self.graphs.replay(size)
        return logits[:len(seqs)], greedy_ids[:len(seqs)]

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
        self._image_copied.wait()  # the image write reads the arena first
        self.arena.sleep(keep_bytes=self._weights_bytes if level == 1 else 0)
        torch.cuda.empty_cache()
        self.sleep_level = level

    def wake_up(self) -> None:
        """Map the same addresses again. Level 1 returns once the copies are queued (the next
        forward waits per module on its chunks); level 2 reloads the weights first. Awake: no-op."""
        if not self.is_sleeping:
            return
        if self.sleep_level == 1:
            self._wake_events = self.arena.wake(pipelined=True)
            self._waited = set()
        else:
            self.arena.wake()
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
        copied the weights), then the host backup, one 64 MiB pinned piece (~30 ms) a call."""
        if self.is_sleeping or self.num_processed_tokens == 0:
            return None
        graphs_left = self.graphs is not None and bool(self.graphs.pending)
        if not graphs_left and not self.arena.host_backup_pending:
            return None
        wait = self._last_busy + IDLE_GRACE_S - time.monotonic()
        if wait > 0:
            return wait
        if graphs_left and self._image_copied.is_set():
            self._capture_pending_graph()
        elif self.arena.host_backup_pending:
            if not self.arena.pin_host_backup_step():
                log.info("host backup pinned: %.2f GiB", self.arena.host_backup_bytes / GiB)
        elif graphs_left:  # only graphs left, the image write still copying: look again soon
            return 0.05
        return 0.0

    def capture_pending_graphs(self) -> None:
        """Capture every decode graph still pending, now (offline use: LLMEngine.generate)."""
        while self.graphs is not None and self.graphs.pending:
            self._image_copied.wait()
            self._capture_pending_graph()

    def _capture_pending_graph(self, size: int | None = None) -> None:
        """Capture `size` (default: the largest pending) now."""
        started = time.perf_counter()
        if self._wake_events is not None:  # never wait on a wake's events inside a capture
            for event in self._wake_events:
                torch.cuda.current_stream().wait_event(event)
            self._wake_events = None
        # the padding state: the warm-up forward before the capture writes the KV of every
        # row, and rows holding a past step's slots would overwrite live (cached) KV
        self.static_input_ids.zero_()
        self.static_positions.zero_()
        self.static_slot_mapping.fill_(self.scratch_block * self.block_size)
        self.static_context_lens.fill_(1)
        self.static_block_tables.fill_(self.scratch_block)
        size = self.graphs.pending[0] if size is None else size
        self.graphs.capture(size)
        log.info("decode graph for batch %d captured in %.3f s%s", size, time.perf_counter() - started,
                 "" if self.graphs.pending else f"; graphs now {self.graphs.sizes}")

    def _register_wake_hooks(self) -> None:
        base = self.arena.ptr
        for module in self.model.modules():
            params = list(module.parameters(recurse=False))
            if not params:
                continue
            chunks = set()
            for p in params:
                start = p.data_ptr() - base
                end = start + p.numel() * p.element_size() - 1
                chunks.update(range(self.arena.chunk_of(start), self.arena.chunk_of(end) + 1))
            module.register_forward_pre_hook(self._make_wake_hook(sorted(chunks)))

    def _make_wake_hook(self, chunks: list[int]):
        def hook(module, args):
            events = self._wake_events
            if events is None:
                return
            stream = torch.cuda.current_stream()
            for c in chunks:
                if c not in self._waited:
                    stream.wait_event(events[c])
                    self._waited.add(c)
        return hook
