"""Structured output: a guided sequence's grammar, followed through llguidance as a token mask.

    guided = GuidedDecoding(vocab_size)     one per engine; guided.tokenizer = the HF tokenizer
    guided.check(guidance)                  None, or why llguidance refuses the schema / grammar
    seq.guide = guided.matcher(guidance)    at admission (ValueError when refused)
    mask_logits(logits, seqs)               before sampling: -inf wherever a seq's grammar forbids
    advance(seq, token_id)                  after: True once the grammar is complete (the seq ends)

Every Guidance becomes one llguidance grammar (`grammar_of`): JSON schemas and "any JSON object"
through its JSON compiler, regexes, choices as a Lark alternation, and "grammar" as llguidance's
Lark (with `%json{...}`, `<|special|>` tokens by name, `/regex/` terminals), or GBNF / EBNF,
which llguidance converts to Lark.

The mask of one step is made on the CPU for all its guided rows at once (llguidance's thread
pool), one bit per token; unguided rows in the same batch allow every token. On a GPU it goes
over from pinned memory without waiting and is applied with one masked_fill, so computing it
overlaps the forward already queued on the device. A step without guided rows costs nothing
but a scan of the rows' `guide` attribute.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import torch

from dormant.engines.base import Guidance

if TYPE_CHECKING:
    from dormant.engines.native.core.sequence import Sequence

log = logging.getLogger("dormant.engine")

# json.dumps' separators: the spacing models saw most in training; flexible whitespace let a
# small model run on in newlines until max_tokens (a schema's "x-guidance" may override these)
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_of(guidance: Guidance) -> str:
    """The llguidance grammar (its JSON form) for `guidance`; ValueError for a value of the
    wrong shape. Whether the grammar itself is valid is the matcher's to say (`check`)."""
    kind, value = guidance.kind, guidance.value
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if kind == "json_schema":
        if isinstance(value, str):
            value = _json(value)
        if not isinstance(value, dict):
            raise ValueError("a JSON schema must be a JSON object")
        return llguidance.LLMatcher.grammar_from_json_schema(value, defaults=JSON_OPTIONS)
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise ValueError("a regex must be a non-empty string")
        return llguidance.LLMatcher.grammar_from_regex(value)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
    if kind == "grammar":
        if not isinstance(value, str) or not value.strip():
            raise ValueError("a grammar must be a non-empty string")
        return llguidance.grammar_from("grammar", value)  # Lark as it is; GBNF converted to Lark
    raise ValueError(f"unknown guidance kind {kind!r}")


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None


class GuidedDecoding:
    """The engine's llguidance tokenizer and the matchers made with it. The tokenizer is built
    on the first guided request (~0.5 s for a 49k vocabulary), not at load: most engines never
    see one, and a cold start pays for nothing it does not use."""

    def __init__(self, vocab_size: int, eos_token_ids: set[int] | None = None):
        self.vocab_size = vocab_size  # the logits' width (a model's padded vocabulary included)
        self.eos_token_ids = eos_token_ids if eos_token_ids is not None else set()  # shared, not copied
        self.tokenizer: Any = None  # the HF tokenizer, set once the worker has it
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()  # the worker's check and the engine's admission may both build it

    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                if self.tokenizer is None:
                    raise ValueError("structured output needs the model's tokenizer, which is not loaded")
                eos = sorted(self.eos_token_ids) or None
                self._ll_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                                                  eos_token=eos)
            return self._ll_tokenizer

    def check(self, guidance: Guidance) -> str | None:
        """Why `guidance` cannot be followed (llguidance's message), or None."""
        try:
            self.matcher(guidance)
        except ValueError as exc:
            return str(exc)
        return None

    def matcher(self, guidance: Guidance) -> llguidance.LLMatcher:
        """A fresh matcher at the grammar's start; ValueError when the grammar is refused."""
        grammar = grammar_of(guidance)
        matcher = llguidance.LLMatcher(self.ll_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error().strip())
        return matcher


_executor: llguidance.LLExecutor | None = None
_host_masks: dict[tuple[int, bool], torch.Tensor] = {}  # (words, pinned) -> the largest batch's buffer
_shifts: dict[torch.device, torch.Tensor] = {}


def mask_logits(logits: torch.Tensor, seqs: list[Sequence]) -> bool:
    """Set to -inf, in place, each logit a guided seq's grammar forbids next; logits [B, V] for
    the B seqs. Returns whether any row was guided (a greedy argmax taken before is stale)."""
    rows = [(seq.guide, i) for i, seq in enumerate(seqs) if seq.guide is not None]
    if not rows:
        return False
    import llguidance.torch  # here, not at import: its torch.compile import is no part of a zygote's preload

    global _executor
    if _executor is None:
        _executor = llguidance.LLExecutor()
    batch, vocab = logits.shape
    words = (vocab + 31) // 32  # the matchers' tokenizer was built with n_vocab = the logits' width
    host = _host_mask(batch, words, pinned=logits.is_cuda)
    unguided = [i for i, seq in enumerate(seqs) if seq.guide is None]
    if unguided:  # every token; numpy's fill, not torch's: see _host_mask
        host.numpy()[unguided] = -1
    llguidance.torch.fill_next_token_bitmask_par(_executor, rows, host)
    mask = host.to(logits.device, non_blocking=True)  # pinned: queued behind the forward
    shifts = _shifts.get(logits.device)
    if shifts is None:
        shifts = _shifts[logits.device] = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((mask.unsqueeze(-1) >> shifts) & 1).view(batch, words * 32)[:, :vocab]
    logits.masked_fill_(allowed == 0, float("-inf"))
    return True


def _host_mask(batch: int, words: int, pinned: bool) -> torch.Tensor:
    """A [batch, words] int32 buffer, kept (a pinned allocation is a driver call): a step's copy
    has finished before the next step refills it, since the sampler waits for its token ids.
    No torch CPU op touches it per step: one as large as a batch's mask runs on torch's OpenMP
    threads, which then spin on every core while llguidance's threads compute the masks (on
    the H200's 16 cores, 32 rows' fill took 4.4 ms in the engine against 0.5 ms alone)."""
    buf = _host_masks.get((words, pinned))
    if buf is None or buf.shape[0] < batch:
        buf = _host_masks[(words, pinned)] = torch.empty((max(batch, 8), words), dtype=torch.int32, pin_memory=pinned)
    return buf[:batch]


def advance(seq: Sequence, token_id: int) -> bool:
    """Feed the sampled token to seq's grammar; True when the sequence should end: the grammar
    is complete (nothing may follow), or the matcher failed (a limit of llguidance's parser),
    where going on could only leave the grammar."""
    guide = seq.guide
    if not guide.consume_token(token_id) or guide.is_error():
        log.error("request %s: structured output stopped: %s", seq.request_id, guide.get_error().strip()[:500])
        return True
    return guide.is_stopped()
