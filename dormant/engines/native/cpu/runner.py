"""The model runner on the CPU: packs a step's inputs, calls the model once, samples one token
per sequence. Weights are views of one `Arena`; the KV cache is one tensor beside it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from dormant.engines.native.core.config import EngineConfig, run_ahead_enabled
from dormant.engines.native.core.engine_image import ArenaImage
from dormant.engines.native.core.logits_ops import (
    prompt_logprob_rows,
    record_chunk_logprobs,
)
from dormant.engines.native.core.sequence import PLACEHOLDER, Sequence
from dormant.engines.native.cpu.attention import METADATA_KWARG, AttentionMetadata, padded_rows
from dormant.engines.native.cpu.model_loader import load_model
from dormant.engines.native.cpu.sampler import Sampler


class CPUModelRunner:
    """core/runner.py's ModelRunner on the CPU."""

    sleep_levels = (1, 2)
    num_decode_graph_steps = 0  # no graphs on the CPU
    decode_graph_gpu_seconds = 0.0

    def __init__(self, config: EngineConfig):
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.model_dir = Path(config.model_dir)
        self.startup_phases: dict[str, float] = {}  # seconds per cold-start phase (worker /stats)
        self.startup_overlap: dict[str, float] = {}  # the CPU's phases run one after another
        started = time.perf_counter()
        self.loaded = load_model(self.model_dir, config.dtype, config.small_batch_tokens, weights=False)
        self.model = self.loaded.model
        self.arena = self.loaded.arena
        self.startup_phases["model_init"] = time.perf_counter() - started
        self.block_size = config.block_size
        self.sampler = Sampler()
        self.runs_ahead = run_ahead_enabled(False)

        hf = self.loaded.hf_config
        self.num_layers = hf.num_hidden_layers
        self.num_kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
        self.head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        self.kv_dtype = self.loaded.dtype
        self.num_slots = config.num_kv_blocks * config.block_size
        # torch.empty: on CPU, KV pages cost RSS only once written.
        self.kv_buffer = torch.empty(
            (2, self.num_layers, self.num_slots, self.num_kv_heads, self.head_dim), dtype=self.kv_dtype
        )
        self.kv_caches = [(self.kv_buffer[0, i], self.kv_buffer[1, i]) for i in range(self.num_layers)]
        self._kv_nbytes = self.kv_buffer.untyped_storage().nbytes()
        self.positions = torch.arange(config.max_model_len + self.block_size)
        self.num_processed_tokens = 0  # tokens run through the model (prefix-cache hits are not)

        self.sleep_level = 0
        startup = {"num_kv_blocks": config.num_kv_blocks, "block_size": config.block_size,
                   "kv_dtype": str(self.kv_dtype).removeprefix("torch."), "max_model_len": config.max_model_len}
        self.image = ArenaImage(self.model_dir, config.dtype, "cpu", self.loaded.layout, startup)
        self._backup_thread: threading.Thread | None = None
        started = time.perf_counter()
        self.weights_source = self._fill_arena()
        self.startup_phases["weight_load"] = time.perf_counter() - started

    def _fill_arena(self) -> str:
        """From the engine image when a good one exists, else from the safetensors; then
        (re)write the image in the background. Returns "image" or "safetensors"."""
        self.arena.reserve()
        if self.image.restore_cpu(self.arena) == "image":
            return "image"
        self.loaded.load_weights(self.model_dir)
        if self.config.backup_weights:
            self._backup_thread = threading.Thread(target=self.image.save_cpu, args=(self.arena,),
                                                   name="dormant-image-write", daemon=True)
            self._backup_thread.start()
        return "safetensors"

    @property
    def image_dir(self) -> Path:
        return self.image.folder

    def save_image(self) -> Path:
        """Make sure the engine image is on disk (before hibernating); returns its folder."""
        if self._backup_thread is not None:
            self._backup_thread.join()
        if not self.is_sleeping:
            self.image.save_cpu(self.arena)
        return self.image.folder

    def idle_work(self) -> None:
        """Nothing is deferred past the CPU's start."""
        return None

    def capture_pending_graphs(self) -> None:
        """No graphs on the CPU."""

    # -- stepping ---------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, seqs: list[Sequence]) -> list[int]:
        """One forward over the step's tokens (each seq's num_scheduled_tokens); returns a
        token id for each seq whose step reaches its last token, in order."""
        is_decode = all(seq.is_decode for seq in seqs)
        input_ids, position_ids, meta, logits_to_keep = (
            self.prepare_decode(seqs) if is_decode else self.prepare_prefill(seqs)
        )
        prompt_rows = [] if is_decode else prompt_logprob_rows(seqs)
        if prompt_rows:  # their chunks' every row, after the sampling rows
            logits_to_keep = torch.cat([logits_to_keep] + [torch.arange(a, b) for _, a, b in prompt_rows])
        self.num_processed_tokens += sum(seq.num_scheduled_tokens for seq in seqs)
        self.loaded.small_rows.set_step(is_decode)
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=logits_to_keep,
            **{METADATA_KWARG: meta},
        )
        logits = out.logits[0]
        sampling = [seq for seq in seqs if seq.samples_this_step]
        record_chunk_logprobs(logits[len(sampling):], prompt_rows)
        return self.sampler(logits[:len(sampling)], sampling) if sampling else []

    def can_launch(self, num_seqs: int) -> bool:
        return True

    def launch(self, seqs: list[Sequence], feed: tuple[list[int], list[int]] | None = None) -> list[int]:
        """run() at once (the CPU has no device to run beside): the handle is the step's
        tokens. Fed seqs hold the fed token in their PLACEHOLDER's place during the forward."""
        if feed is None:
            return self.run(seqs)
        tokens, rows = feed
        for seq, row in zip(seqs, rows):
            seq.token_ids[-1] = tokens[row]
        try:
            return self.run(seqs)
        finally:
            for seq in seqs:
                seq.token_ids[-1] = PLACEHOLDER

    def collect(self, launched: list[int]) -> list[int]:
        return launched

    def prepare_prefill(self, seqs: list[Sequence]):
        """A packed step of prompt chunks and decodes: each seq's tokens from
        num_computed_tokens on; its earlier tokens (cached prefix, earlier chunks) are read
        from the KV cache. Padded to whole row tiles (cpu/attention.py) with token 0 at
        position 0, rows that write no KV and are never sampled."""
        tokens, positions, slots, contexts, cu_seqlens, last = [], [], [], [], [0], []
        bs = self.block_size
        for seq in seqs:
            start = seq.num_computed_tokens
            end = start + seq.num_scheduled_tokens
            tokens.extend(seq.token_ids[start:end])
            table = torch.tensor(seq.block_table)
            pos = self.positions[:end]
            seq_slots = table[pos // bs] * bs + pos % bs
            positions.append(pos[start:])
            slots.append(seq_slots[start:])
            contexts.append(seq_slots)
            cu_seqlens.append(cu_seqlens[-1] + end - start)
            if seq.samples_this_step:
                last.append(cu_seqlens[-1] - 1)
        meta = AttentionMetadata(
            is_prefill=True,
            slot_mapping=torch.cat(slots),
            cu_seqlens=cu_seqlens,
            context_slots=contexts,
            kv_caches=self.kv_caches,
        )
        padding = padded_rows(len(tokens)) - len(tokens)
        input_ids = torch.tensor(tokens + [0] * padding).unsqueeze(0)
        position_ids = torch.cat(positions + [self.positions[:1].expand(padding)]).unsqueeze(0)
        return input_ids, position_ids, meta, torch.tensor(last, dtype=torch.long)

    def prepare_decode(self, seqs: list[Sequence]):
        bs = self.block_size
        context_lens = [seq.num_tokens for seq in seqs]
        max_len = max(context_lens)
        max_blocks = max(len(seq.block_table) for seq in seqs)
        block_tables = torch.tensor([seq.block_table + [0] * (max_blocks - len(seq.block_table)) for seq in seqs])
        pos = self.positions[:max_len]
        gather_slots = block_tables[:, pos // bs] * bs + pos % bs  # [B, L]
        lens = torch.tensor(context_lens)
        last_pos = lens - 1
        slot_mapping = gather_slots.gather(1, last_pos.unsqueeze(1)).squeeze(1)
        meta = AttentionMetadata(
            is_prefill=False,
            slot_mapping=slot_mapping,
            cu_seqlens=[],
            gather_slots=gather_slots,
            decode_mask=(pos.unsqueeze(0) < lens.unsqueeze(1)).view(len(seqs), 1, 1, max_len),
            context_lens=lens,
            block_tables=block_tables,
            kv_caches=self.kv_caches,
        )
        input_ids = torch.tensor([seq.last_token for seq in seqs]).unsqueeze(0)
        return input_ids, last_pos.unsqueeze(0), meta, 0

    # -- sleep ------------------------------------------------------------------------------

    @property
    def weights_bytes(self) -> int:
        return self.arena.nbytes

    @property
    def kv_cache_bytes(self) -> int:
        return self._kv_nbytes

    @property
    def is_sleeping(self) -> bool:
        return self.sleep_level > 0

    def sleep(self, level: int = 1) -> None:
        """Level 1: weights kept in the engine image in the store; level 2: dropped (wake
        restores them from the image if one is there, else from the model's safetensors).
        Both free the weights' and the KV cache's memory."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        if self.is_sleeping:
            return
        if level == 1:
            self.save_image()
        self.arena.release()
        self.kv_buffer.untyped_storage().resize_(0)
        self.sleep_level = level

    def wake_up(self) -> None:
        if not self.is_sleeping:
            return
        self.kv_buffer.untyped_storage().resize_(self._kv_nbytes)
        self.weights_source = self._fill_arena()
        self.sleep_level = 0
