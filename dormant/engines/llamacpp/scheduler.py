"""The step loop over llama.cpp's batch API: every running request is one sequence id of the
shared KV cache, and one llama_decode carries every decode token plus prompt chunks.

    engine.add_request(id, prompt, params)   # waits for a free sequence
    outputs = engine.step()                  # [(id, new_ids, finished, reason)], failures
    engine.abort_request(id)                 # its sequence is free for the next request

A sequence outlives its request: the KV of what it computed stays in the cache, and a later
prompt that starts the same way takes that sequence and computes only the rest (llama-server's
slot cache). The cells of idle sequences are dropped when the cache is full.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass, field

import llama_cpp as lc

from dormant.engines.base import SamplingParams
from dormant.engines.llamacpp.model import LlamaModel
from dormant.engines.llamacpp.sampler import Sampler, check_supported

log = logging.getLogger("dormant.engine")


class KVCacheFull(RuntimeError):
    pass


# a prompt takes a running sequence's cells when they save it at least this many tokens: the
# copy is of the whole KV stream (~47 MB at 2,048 cells for SmolLM2, a few ms), where SmolLM2
# computes a prompt token in ~3 ms on 2 cores
SHARE_MIN_TOKENS = 16
_WAIT = object()  # _donor: a running request is computing the start this prompt needs


@dataclass
class Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    sampler: Sampler | None = None
    seq: Sequence | None = None
    output: list[int] = field(default_factory=list)


@dataclass
class Sequence:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # what its cells in the KV cache hold
    request: Request | None = None
    last_used: int = 0  # the scheduler's count of requests when one last left it


@dataclass
class KeptPrefix:
    """A sequence's cells copied out of the KV cache while asleep (llama.cpp's sequence state)."""
    seq_id: int
    tokens: list[int]
    state: ctypes.Array


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Scheduler:
    def __init__(self, model: LlamaModel):
        self.model = model
        self.config = model.config
        self.sequences = [Sequence(i) for i in range(self.config.max_num_seqs)]
        self.waiting: list[Request] = []
        self.batch = lc.llama_batch_init(self.config.max_num_batched_tokens, 0, 1)
        self.num_prefix_hit_tokens = 0  # prompt tokens taken from the cache instead of computed
        self.kept: list[KeptPrefix] = []  # while asleep: the prefixes wake puts back
        self._num_released = 0

    @property
    def running(self) -> list[Request]:
        return [s.request for s in self.sequences if s.request is not None]

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting) or any(s.request is not None for s in self.sequences)

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        check_supported(params)
        if not prompt:
            raise ValueError("the prompt is empty")
        self.waiting.append(Request(request_id, list(prompt), params))

    def abort_request(self, request_id: str) -> None:
        self.waiting = [r for r in self.waiting if r.request_id != request_id]
        for seq in self.sequences:
            if seq.request is not None and seq.request.request_id == request_id:
                self._release(seq)

    def forget_cache(self) -> None:
        """The model's context is gone (sleep): no sequence holds cells any more."""
        for seq in self.sequences:
            seq.tokens = []

    def keep_prefixes(self, budget: int) -> int:
        """Before a sleep (nothing running): copy out the cells of the most recently used
        sequences that fit in `budget` bytes together; `restore_prefixes` puts them back after
        the wake. Returns the bytes kept."""
        self.kept, used = [], 0
        if not self.config.enable_prefix_caching:
            return 0
        ctx = self.model.ctx
        for seq in sorted((s for s in self.sequences if s.tokens), key=lambda s: -s.last_used):
            size = lc.llama_state_seq_get_size(ctx, seq.seq_id)
            if used + size > budget:
                continue  # a shorter one may still fit
            state = (ctypes.c_uint8 * size)()
            if lc.llama_state_seq_get_data(ctx, state, size, seq.seq_id) != size:
                log.warning("sequence %d: llama.cpp did not copy out its %d bytes; its prefix is not kept",
                            seq.seq_id, size)
                continue
            self.kept.append(KeptPrefix(seq.seq_id, list(seq.tokens), state))
            used += size
        return used

    def restore_prefixes(self) -> int:
        """After a wake: the kept cells back into their sequences. Returns the tokens restored."""
        kept, self.kept, restored = self.kept, [], 0
        for prefix in kept:
            seq = self.sequences[prefix.seq_id]
            if lc.llama_state_seq_set_data(self.model.ctx, prefix.state, len(prefix.state), prefix.seq_id) == 0:
                log.warning("sequence %d: llama.cpp did not take back its kept prefix", prefix.seq_id)
                self.model.clear_sequence(prefix.seq_id)
                continue
            seq.tokens = prefix.tokens
            restored += len(prefix.tokens)
        return restored

    def step(self) -> tuple[list[tuple[str, list[int], bool, str | None]], list[tuple[str, BaseException]]]:
        self._admit()
        rows = self._fill_batch()
        failed = self._decode()
        return self._sample(rows), failed

    # -- the step's parts ---------------------------------------------------------------------

    def _admit(self) -> None:
        """Waiting requests take idle sequences: the one whose cached tokens share the longest
        start with the prompt; its cells past that start are dropped. Where a running sequence
        holds a longer start (n > 1 candidates of one prompt, a shared system prompt), its cells
        are copied over; where a running request is still computing one, the prompt waits for it
        (a step or a few) instead of computing the same tokens beside it."""
        deferred: list[Request] = []
        while self.waiting:
            idle = [s for s in self.sequences if s.request is None]
            if not idle:
                break
            req = self.waiting.pop(0)
            seq = max(idle, key=lambda s: (_common_prefix(s.tokens, req.prompt), -len(s.tokens)))
            cached = _common_prefix(seq.tokens, req.prompt)
            donor = self._donor(req.prompt, cached) if self.config.enable_prefix_caching else None
            if donor is _WAIT:
                deferred.append(req)
                continue
            if donor is not None:
                self.model.copy_sequence(donor.seq_id, seq.seq_id)
                cached = _common_prefix(donor.tokens, req.prompt)
            # at least the prompt's last token is computed again: its logits are the first draw's
            keep = min(cached, len(req.prompt) - 1) if self.config.enable_prefix_caching else 0
            self.model.clear_sequence(seq.seq_id, keep)
            seq.tokens = req.prompt[:keep]
            self.num_prefix_hit_tokens += keep
            req.sampler = Sampler(req.params, lc.llama_vocab_n_tokens(self.model.vocab))
            req.seq, seq.request = seq, req
        self.waiting[:0] = deferred

    def _donor(self, prompt: list[int], cached: int):
        """A running sequence whose computed tokens start as `prompt` does for SHARE_MIN_TOKENS
        more than `cached`; _WAIT where a running request's prompt, not yet computed, would."""
        best, best_len = None, cached + SHARE_MIN_TOKENS - 1
        for s in self.sequences:
            if s.request is not None and (n := _common_prefix(s.tokens, prompt)) > best_len:
                best, best_len = s, n
        pending = any(not s.request.output and _common_prefix(s.request.prompt, prompt) > best_len
                      for s in self.sequences if s.request is not None)
        return _WAIT if pending else best

    def _fill_batch(self) -> list[tuple[Request, int]]:
        """Each decoding request's last token, then prompt chunks in the room left; the rows
        whose logits are sampled."""
        batch, n, rows = self.batch, 0, []
        room = self.config.max_num_batched_tokens
        running = self.running
        decoding = [r for r in running if r.output]
        prefilling = [r for r in running if not r.output]
        for req in decoding:
            n = self._put(req.seq, [req.output[-1]], n, wants_logits=True)
            rows.append((req, n - 1))
        for req in prefilling:
            if n >= room:
                break
            start = len(req.seq.tokens)
            chunk = req.prompt[start:start + room - n]
            n = self._put(req.seq, chunk, n, wants_logits=start + len(chunk) == len(req.prompt))
            if start + len(chunk) == len(req.prompt):
                rows.append((req, n - 1))
        batch.n_tokens = n
        return rows

    def _put(self, seq: Sequence, tokens: list[int], n: int, wants_logits: bool) -> int:
        batch, pos = self.batch, len(seq.tokens)
        for i, token in enumerate(tokens):
            batch.token[n] = token
            batch.pos[n] = pos + i
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = seq.seq_id
            batch.logits[n] = wants_logits and i == len(tokens) - 1
            n += 1
        seq.tokens.extend(tokens)
        return n

    def _decode(self) -> list[tuple[str, BaseException]]:
        """llama_decode; where the cache has no room, idle sequences' cells go first, then the
        newest request fails (it would need the cells of requests that started before it)."""
        failed: list[tuple[str, BaseException]] = []
        while self.batch.n_tokens:
            status = lc.llama_decode(self.model.ctx, self.batch)
            if status == 0:
                return failed
            if status != 1:
                raise RuntimeError(f"llama_decode failed with status {status}")
            idle = [s for s in self.sequences if s.request is None and s.tokens]
            if idle:
                for seq in idle:
                    self.model.clear_sequence(seq.seq_id)
                    seq.tokens = []
                continue
            newest = self.running[-1]
            log.warning("KV cache full: request %s fails", newest.request_id)
            failed.append((newest.request_id, KVCacheFull(
                f"the KV cache ({self.config.kv_cache_tokens} tokens) is full; raise engine_args.max_model_len")))
            self._drop_rows(newest.seq.seq_id)
            self._release(newest.seq, keep_cache=False)
        return failed

    def _drop_rows(self, seq_id: int) -> None:
        """Take a failed sequence's tokens out of the batch (rows after them move up)."""
        batch, kept = self.batch, 0
        for i in range(batch.n_tokens):
            if batch.seq_id[i][0] != seq_id:
                for name in ("token", "pos", "n_seq_id", "logits"):
                    getattr(batch, name)[kept] = getattr(batch, name)[i]
                batch.seq_id[kept][0] = batch.seq_id[i][0]
                kept += 1
        batch.n_tokens = kept

    def _sample(self, rows: list[tuple[Request, int]]) -> list[tuple[str, list[int], bool, str | None]]:
        batch = self.batch
        # the row of each sequence's logits, read again: a failed request's rows left the batch
        logits_row = {batch.seq_id[i][0]: i for i in range(batch.n_tokens) if batch.logits[i]}
        outputs = []
        for req, _ in rows:
            if req.seq is None:  # failed in _decode
                continue
            token = req.sampler.sample(self.model.ctx, logits_row[req.seq.seq_id])
            req.output.append(token)
            reason = self._finish_reason(req, token)
            if reason is not None:
                self._release(req.seq)
            outputs.append((req.request_id, [token], reason is not None, reason))
        return outputs

    def _finish_reason(self, req: Request, token: int) -> str | None:
        params = req.params
        if not params.ignore_eos and lc.llama_vocab_is_eog(self.model.vocab, token):
            return "stop"
        if token in params.stop_token_ids:
            return "stop"
        if params.max_tokens is not None and len(req.output) >= params.max_tokens:
            return "length"
        if len(req.prompt) + len(req.output) >= self.config.max_model_len:
            return "length"
        return None

    def _release(self, seq: Sequence, keep_cache: bool = True) -> None:
        """The request leaves its sequence; the cells it computed stay for a later prompt."""
        req = seq.request
        if req is not None:
            req.sampler.free()
            req.seq = None
        seq.request = None
        self._num_released += 1
        seq.last_used = self._num_released
        if not (keep_cache and self.config.enable_prefix_caching):
            self.model.clear_sequence(seq.seq_id)
            seq.tokens = []
