"""The GPU runner's steps: a packed eager forward, or a decode graph over static buffers.

A step of decodes only replays the graph of its padded batch size (cuda/graphs.py), its
inputs filled by one host-to-device copy from pinned staging (plus one for the block tables).
Through launch / collect it runs ahead (core/llm_engine.py): queued with its sampling and the
tokens' copy back, the next step fed from its tokens on the device before they are read;
any other step (prompt tokens, chunks, decodes riding along) runs as one eager forward over
the packed tokens. After a level-1 wake, the first forward waits, module by module, on the
events of the arena chunks that hold the module's parameters (the wake hooks).
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import torch

from dormant.engines.native.core.logits_ops import on_device, record_chunk_logprobs
from dormant.engines.native.core.sequence import Sequence
from dormant.engines.native.core.step_plan import TABLE_ALIGN, fill_decode_rows, plan_packed_step
from dormant.engines.native.cpu.attention import METADATA_KWARG
from dormant.engines.native.cuda.attention import PREFILL_BLOCK_M, GPUAttentionMetadata
from dormant.engines.native.cuda.start import round_up

log = logging.getLogger("dormant.engine")


class LaunchSlot(NamedTuple):
    """What one launched decode step uses until it is collected (two, used in turn: a step
    is collected before the one two launches later reuses its slot)."""
    start: torch.cuda.Event  # around the replay: decode_graph_gpu_seconds
    end: torch.cuda.Event
    done: torch.cuda.Event  # the tokens' copy to the host has passed
    tokens: torch.Tensor  # pinned [max_num_seqs] long: the sampled ids


class Launched(NamedTuple):
    token_ids: torch.Tensor  # [num_seqs] on the device: what a fed step reads
    slot: LaunchSlot
    num_seqs: int


class RunnerSteps:
    """GPUModelRunner's stepping (cuda/runner.py holds the class and its state)."""

    @torch.inference_mode()
    def run(self, seqs: list[Sequence]) -> list[int]:
        """One step over each seq's num_scheduled_tokens; a token id for each seq whose step
        reaches its last token, in order."""
        size = None
        if self.graphs is not None and all(seq.is_decode for seq in seqs):
            size = self._graph_size(len(seqs))
        if size is not None:
            self._wait_for_wake()
            logits, greedy_ids = self._decode(seqs, size)
        else:
            logits, greedy_ids = self._forward_packed(seqs), None
        self._wake_events = None
        self.num_processed_tokens += sum(seq.num_scheduled_tokens for seq in seqs)
        self._last_busy = time.monotonic()
        sampling = [seq for seq in seqs if seq.samples_this_step]
        if self._prompt_rows:  # rows after the sampling ones: prompt chunks that asked for logprobs
            record_chunk_logprobs(logits[len(sampling):], self._prompt_rows)
            logits, self._prompt_rows = logits[:len(sampling)], []
        token_ids = self.sampler(logits, sampling, greedy_ids) if sampling else []
        if size is not None:  # the sampler read its tokens back: the replay's end has passed
            start, end = self._replay_events
            end.synchronize()
            self.num_decode_graph_steps += 1
            self.decode_graph_gpu_seconds += start.elapsed_time(end) / 1000
        return token_ids

    def can_launch(self, num_seqs: int) -> bool:
        """A decode step of num_seqs goes through launch where a graph holds it."""
        return self.graphs is not None and self.graphs.padded_size(num_seqs) is not None

    @torch.inference_mode()
    def launch(self, seqs: list[Sequence], feed: tuple[Launched, list[int]] | None = None) -> Launched:
        """A decode graph's replay and the sampling after it, queued on the device; the tokens
        are copied to pinned memory behind an event (core/runner.py's contract). A fed step's
        input ids are the fed launch's tokens, gathered on the device: its own tokens need not
        have reached the host."""
        n = len(seqs)
        size = self._graph_size(n)
        self._wait_for_wake()
        slot = self._launch_slots[self._launch_flip]
        self._launch_flip ^= 1
        self._fill_decode_inputs(seqs, size)
        if feed is not None:
            fed, rows = feed
            if rows == list(range(n)):
                self.static_input_ids[:n].copy_(fed.token_ids[:n])
            else:
                index = on_device(rows, self.device)
                self.static_input_ids[:n].copy_(fed.token_ids.index_select(0, index))
        slot.start.record()
        logits, greedy_ids = self.graphs.replay(size)
        slot.end.record()
        self._wake_events = None
        self.num_processed_tokens += n
        self._last_busy = time.monotonic()
        token_ids = self.sampler.choose(logits[:n], seqs, greedy_ids[:n])
        slot.tokens[:n].copy_(token_ids, non_blocking=True)
        slot.done.record()
        return Launched(token_ids, slot, n)

    def collect(self, launched: Launched) -> list[int]:
        """The launch's tokens, once its copy to the host has passed (a step launched after
        it may still run)."""
        slot = launched.slot
        slot.done.synchronize()
        self.num_decode_graph_steps += 1
        self.decode_graph_gpu_seconds += slot.start.elapsed_time(slot.end) / 1000
        return slot.tokens[:launched.num_seqs].tolist()

    def _graph_size(self, num_seqs: int) -> int | None:
        """The padded size whose graph a decode step of num_seqs replays; first a capture where
        the padding is over 2x (graphs.worth_capturing): 64 streams right after a restore once
        met a new batch size every few steps and waited ~0.1-0.2 s on each (issue 12). Idle
        time captures the sizes still pending. Also while a cold start's image write copies
        the weights (a thread_local capture: that thread's calls do not invalidate it): the
        first burst after a cold start ran in the graph of 256 to its end."""
        wanted = self.graphs.worth_capturing(num_seqs)
        if wanted is not None:
            self._capture_pending_graph(wanted)
        return self.graphs.padded_size(num_seqs)

    def _wait_for_wake(self) -> None:
        if self._wake_events is not None:  # graphs read every layer: wait for all of it
            for event in self._wake_events:
                torch.cuda.current_stream().wait_event(event)

    def _forward_packed(self, seqs: list[Sequence]) -> torch.Tensor:
        """One eager forward over the step's tokens, decodes packed first (one Triton launch),
        then prompt chunks. Returns the logits of the seqs that sample, in seqs' order, then
        those of every row of the chunks that ask for prompt logprobs (`_prompt_rows`)."""
        plan = plan_packed_step(seqs, self.block_size, self.scratch_block, PREFILL_BLOCK_M,
                                gather_context=not self.is_compact)
        self._prompt_rows = plan.prompt_rows
        # one host-to-device copy for every vector of the step
        flat, starts = plan.vectors()
        packed = torch.tensor(flat, dtype=torch.long).pin_memory().to(self.device, non_blocking=True)
        lengths = (len(plan.tokens),) * 3 + (len(plan.keep), len(plan.context_lens)) + (len(plan.query_blocks[0]),) * 3
        input_ids, position_ids, slot_mapping, logits_to_keep, context_lens, *prefill_blocks = (
            packed[start:start + n] for start, n in zip(starts, lengths))
        prefill_blocks, ctx = tuple(prefill_blocks), packed[starts[-1]:]
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
        # the decode kernels' table stride: a multiple of 16, as an eager step's (step_plan.py)
        self.max_blocks_per_seq = round_up(-(-self.config.max_model_len // self.block_size), TABLE_ALIGN)
        dev = self.device
        # rows: input ids, positions, slots, context lengths; one copy fills them all
        self.static_inputs = torch.zeros((4, n), dtype=torch.long, device=dev)
        self.static_input_ids, self.static_positions, self.static_slot_mapping, self.static_context_lens = self.static_inputs
        self.static_slot_mapping.fill_(self.scratch_block * self.block_size)
        self.static_context_lens.fill_(1)
        self.static_block_tables = torch.full((n, self.max_blocks_per_seq), self.scratch_block, dtype=torch.int32, device=dev)
        # pinned staging, two of each: a step fills one while the other's copy may be in flight;
        # one pinned allocation (each costs a driver call, ~35 ms apiece at start)
        # (launches: the sampled tokens back, two as well)
        inputs_bytes, tables_bytes = 4 * n * 8, round_up(n * self.max_blocks_per_seq * 4, 8)
        each = inputs_bytes + tables_bytes + n * 8
        pinned = torch.empty(2 * each, dtype=torch.uint8, pin_memory=True)
        self._host_inputs, self._host_tables, self._launch_slots = [], [], []
        for i in range(2):
            base = i * each
            self._host_inputs.append(pinned[base:base + inputs_bytes].view(torch.long).view(4, n).zero_())
            tables = pinned[base + inputs_bytes:base + inputs_bytes + n * self.max_blocks_per_seq * 4].view(torch.int32)
            self._host_tables.append(tables.view(n, self.max_blocks_per_seq).fill_(self.scratch_block))
            tokens = pinned[base + inputs_bytes + tables_bytes:base + each].view(torch.long)
            self._launch_slots.append(LaunchSlot(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True),
                                                 torch.cuda.Event(), tokens))
        self._flip = self._launch_flip = 0

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
        self._fill_decode_inputs(seqs, size)
        start, end = self._replay_events
        start.record()
        logits, greedy_ids = self.graphs.replay(size)
        end.record()
        return logits[:len(seqs)], greedy_ids[:len(seqs)]

    def _fill_decode_inputs(self, seqs: list[Sequence], size: int) -> None:
        """The static buffers of a decode graph of `size` rows, from pinned staging in two
        copies (the other staging may still be in flight)."""
        host_t, tables_t = self._host_inputs[self._flip], self._host_tables[self._flip]
        self._flip ^= 1
        fill_decode_rows(host_t.numpy(), tables_t.numpy(), seqs, size, self.block_size, self.scratch_block)
        self.static_inputs.copy_(host_t, non_blocking=True)
        self.static_block_tables[:size].copy_(tables_t[:size], non_blocking=True)  # whole rows: contiguous

    def _capture_pending_graph(self, size: int | None = None) -> None:
        """Capture `size` (default: the next pending decode graph) now."""
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
        size = self.graphs.capture_next(size)
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
